"""Latency/bandwidth (α–β) models of the collectives, and their least-squares fit.

Every collective on ``n`` ranks with a message of ``S`` bytes is modelled as

    t(S) = a(op, n) · α + b(op, n) · S / B

``α`` is the latency of one communication step (seconds) and ``B`` the
bandwidth of one link (bytes/s). ``S`` follows nccl-tests: the buffer size for
all_reduce and broadcast, the *total* (gathered) size for all_gather, the total
input size for reduce_scatter.

| op             | a(op, n)  | b(op, n)     | model                                   |
|----------------|-----------|--------------|-----------------------------------------|
| all_reduce     | 2(n−1)    | 2(n−1)/n     | ring: reduce-scatter, then all-gather   |
| all_gather     | n−1       | (n−1)/n      | ring: each rank forwards n−1 chunks     |
| reduce_scatter | n−1       | (n−1)/n      | ring: each rank reduces n−1 chunks      |
| broadcast      | n−1       | 1            | pipelined chain: n−1 hops, S sent once  |

``b(op, n)`` is also nccl-tests' bus-bandwidth factor: ``algbw = S / t`` and
``busbw = algbw · b(op, n)``. Bus bandwidth is the rate one link must carry,
so it can be read against the hardware's link rate whatever the op and the
number of ranks, and in the model it tends to ``B`` for large messages.

With one rank nothing is communicated: ``b`` is 0 for the reducing and
gathering ops (nccl-tests prints busbw 0 there too) and no fit is made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def _check(op: str, world_size: int) -> None:
    if op not in OPS:
        raise ValueError(f"unknown collective {op!r}; known: {', '.join(OPS)}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1 (got {world_size})")


def latency_steps(op: str, world_size: int) -> float:
    """a(op, n): how many times the per-step latency α is paid."""
    _check(op, world_size)
    n = world_size
    return float(2 * (n - 1) if op == "all_reduce" else n - 1)


def bus_factor(op: str, world_size: int) -> float:
    """b(op, n): nccl-tests' bus-bandwidth factor, ``busbw = algbw · b``."""
    _check(op, world_size)
    n = world_size
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    return 1.0


def model_time_s(op: str, world_size: int, size_bytes: float, alpha_s: float, bandwidth_Bps: float) -> float:
    """t(S) of the model; ``bandwidth_Bps`` may be ``math.inf`` (no bandwidth term)."""
    return latency_steps(op, world_size) * alpha_s + bus_factor(op, world_size) * size_bytes / bandwidth_Bps


def model_busbw_GBps(op: str, world_size: int, size_bytes: float, alpha_s: float, bandwidth_Bps: float) -> float:
    """Bus bandwidth the model predicts at ``size_bytes``."""
    time_s = model_time_s(op, world_size, size_bytes, alpha_s, bandwidth_Bps)
    return bus_factor(op, world_size) * size_bytes / time_s / 1e9 if time_s > 0 else math.inf


@dataclass(frozen=True)
class Fit:
    """α and B of one (op, transport), fitted to measured (size, time) points."""

    op: str
    transport: str
    world_size: int
    alpha_s: float
    """Latency per communication step."""
    bandwidth_GBps: float | None
    """Link bandwidth B in 1e9 B/s; None when the timings show no bandwidth term."""
    rms_rel_error: float
    """Root-mean-square of (model − measured) / measured over the points."""

    @property
    def bandwidth_Bps(self) -> float:
        return math.inf if self.bandwidth_GBps is None else self.bandwidth_GBps * 1e9

    def time_s(self, size_bytes: float) -> float:
        return model_time_s(self.op, self.world_size, size_bytes, self.alpha_s, self.bandwidth_Bps)

    def busbw_GBps(self, size_bytes: float) -> float:
        return model_busbw_GBps(self.op, self.world_size, size_bytes, self.alpha_s, self.bandwidth_Bps)

    def record(self) -> dict[str, object]:
        """The entry of commbench.json's ``fit`` list."""
        return {"op": self.op, "transport": self.transport, "alpha_s": self.alpha_s,
                "bandwidth_GBps": self.bandwidth_GBps, "rms_rel_error": self.rms_rel_error}


def _weighted_lstsq(design: np.ndarray, times_s: np.ndarray) -> np.ndarray:
    # Relative errors: timings span orders of magnitude, and plain least squares
    # would let the largest messages decide α as well as B.
    weights = 1.0 / times_s
    coef, *_ = np.linalg.lstsq(design * weights[:, None], times_s * weights, rcond=None)
    return coef


def _nonnegative_fit(design: np.ndarray, times_s: np.ndarray) -> np.ndarray:
    """Least squares with α ≥ 0 and 1/B ≥ 0: the unconstrained optimum, or the best on a boundary."""
    coef = _weighted_lstsq(design, times_s)
    if (coef >= 0).all():
        return coef
    candidates = []
    for keep in (0, 1):
        single = np.zeros(2)
        single[keep] = max(0.0, float(_weighted_lstsq(design[:, [keep]], times_s)[0]))
        candidates.append(single)
    return min(candidates, key=lambda c: float(np.sum(((design @ c - times_s) / times_s) ** 2)))


def fit(op: str, transport: str, world_size: int, sizes_bytes: Sequence[float], times_s: Sequence[float]) -> Fit | None:
    """Fit α and B of ``op``'s model to measured median times; None with one rank or under two sizes."""
    _check(op, world_size)
    sizes = np.asarray(sizes_bytes, dtype=float)
    times = np.asarray(times_s, dtype=float)
    if sizes.shape != times.shape:
        raise ValueError(f"{len(sizes)} sizes but {len(times)} times")
    if world_size < 2 or len(np.unique(sizes)) < 2:
        return None
    if (times <= 0).any():
        raise ValueError("every measured time must be > 0")
    a = latency_steps(op, world_size)
    b = bus_factor(op, world_size)
    # Linear in the unknowns (α, 1/B): t = a·α + (b·S)·(1/B).
    design = np.column_stack([np.full_like(sizes, a), b * sizes])
    alpha_s, inv_bandwidth = (float(x) for x in _nonnegative_fit(design, times))
    predicted = design @ np.array([alpha_s, inv_bandwidth])
    rms = float(np.sqrt(np.mean(((predicted - times) / times) ** 2)))
    # A bandwidth term below rounding noise of the largest time means "no bandwidth limit seen".
    seen = inv_bandwidth * b * sizes.max() > 1e-9 * times.max()
    bandwidth = 1.0 / inv_bandwidth / 1e9 if seen else None
    return Fit(op, transport, world_size, alpha_s, bandwidth, rms)
