"""The discrete-event model of DDP's gradient bucket pipeline, and the α/β cost of a ring all-reduce.

Torch-free. DDP hands bucket ``i`` to the backend when it is ready (its gradients are computed)
and never before bucket ``i - 1``; the backend works through them one after another on the
link. With ready times ``r_i`` and costs ``c_i``:

    start_i = max(r_i, done_{i-1}),   done_i = start_i + c_i

and backward ends at ``max(compute_end, done_last)``: the exposed communication is what sticks
out past backward's own compute. A backend that runs two buckets at once (gloo's two worker
threads) shares the same link between them; the last completion, which is all that the step
sees, is the same as with one after another as long as the link is the bottleneck.

The cost of one all-reduce of ``S`` wire bytes on ``n`` ranks is the ring model of
``scaling.bench.commfit``: ``2(n-1)·α + 2(n-1)/n · S/B``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FIRST_BUCKET_BYTES = 1024 * 1024
"""DDP's first bucket (the last layers' gradients) is capped at 1 MiB, whatever ``bucket_cap_mb`` is."""

HOOK_WIRE_FACTOR = {"allreduce": 1.0, "fp16": 0.5, "bf16": 0.5}
"""Wire bytes per gradient byte of each hook the model can price (fp32 gradients)."""


@dataclass(frozen=True)
class Link:
    """α/β of a ring all-reduce: ``alpha_s`` per communication step, ``bandwidth_Bps`` per link and direction."""

    alpha_s: float
    bandwidth_Bps: float
    source: str
    """Where the numbers come from, in words (a commbench fit, a given rate, the runs' own buckets)."""

    def allreduce_s(self, wire_bytes: float, world_size: int) -> float:
        if world_size < 2:
            return 0.0
        n = world_size
        per_byte = 0.0 if math.isinf(self.bandwidth_Bps) else 1.0 / self.bandwidth_Bps
        return 2 * (n - 1) * self.alpha_s + 2 * (n - 1) / n * wire_bytes * per_byte

    def at(self, world_size: int) -> Link:
        return self


@dataclass(frozen=True)
class Links:
    """Links measured at several world sizes (a commbench at each): a target is priced with the fit
    at its own world size, else with the one at the nearest measured world size (ring formula).

    Where the cost of an all-reduce does not follow the ring model from one world size to another
    (processes that share cores, a switch that saturates), a fit at the target's world size holds
    what the model cannot carry over.
    """

    by_world_size: tuple[tuple[int, Link], ...]
    """(world size, link), ascending."""

    def __post_init__(self) -> None:
        if not self.by_world_size:
            raise ValueError("no link")

    def at(self, world_size: int) -> Link:
        return min(self.by_world_size, key=lambda wl: (abs(math.log(wl[0]) - math.log(max(1, world_size))),
                                                       -wl[0]))[1]

    def measured_at(self, world_size: int) -> bool:
        return any(n == world_size for n, _ in self.by_world_size)

    def allreduce_s(self, wire_bytes: float, world_size: int) -> float:
        return self.at(world_size).allreduce_s(wire_bytes, world_size)

    @property
    def source(self) -> str:
        sizes = ", ".join(str(n) for n, _ in self.by_world_size)
        return f"links measured at {sizes} ranks, each world size priced with its own or the nearest"


@dataclass(frozen=True)
class Pipeline:
    """One backward pass as the model sees it (seconds from the start of backward)."""

    start_s: list[float]
    done_s: list[float]
    compute_end_s: float
    end_s: float
    """Backward returns: its compute and every bucket done."""

    @property
    def exposed_s(self) -> float:
        return self.end_s - self.compute_end_s

    @property
    def busy_s(self) -> float:
        """Union of the [start, done] intervals: the link's busy time."""
        return union_length(list(zip(self.start_s, self.done_s)))


def simulate(ready_s: Sequence[float], cost_s: Sequence[float], compute_end_s: float | None = None) -> Pipeline:
    """Buckets launched in order, each when ready and the previous one done."""
    if len(ready_s) != len(cost_s):
        raise ValueError(f"{len(ready_s)} ready times but {len(cost_s)} costs")
    starts, dones = [], []
    previous = 0.0
    for ready, cost in zip(ready_s, cost_s):
        start = max(ready, previous)
        previous = start + cost
        starts.append(start)
        dones.append(previous)
    compute_end = max([compute_end_s or 0.0, *ready_s]) if ready_s else (compute_end_s or 0.0)
    return Pipeline(starts, dones, compute_end, max(compute_end, previous))


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, current = 0.0, None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    if current is not None:
        total += current[1] - current[0]
    return total


def rebucket(bytes_in_order: Sequence[int], ready_s: Sequence[float], cap_bytes: float,
             first_cap_bytes: float = FIRST_BUCKET_BYTES) -> tuple[list[int], list[float]]:
    """Buckets of another ``bucket_cap_mb``: (bytes, ready time) of each, in launch order.

    The measured buckets give gradient bytes against the time they became ready; within a
    bucket the bytes are taken as ready at an even rate since the previous bucket was (a
    parameter's gradient is not split in reality: the boundaries are approximate).
    """
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(bytes_in_order, dtype=float))])
    times = np.concatenate([[0.0], np.maximum.accumulate(np.asarray(ready_s, dtype=float))])
    total = cumulative[-1]
    edges, edge = [], 0.0
    while edge < total:
        edge = min(total, edge + (min(first_cap_bytes, cap_bytes) if not edges else cap_bytes))
        edges.append(edge)
    sizes = np.diff([0.0, *edges])
    ready = np.interp(edges, cumulative, times)
    return [int(round(s)) for s in sizes], [float(r) for r in ready]


@dataclass(frozen=True)
class Period:
    """Buckets that kept the link busy back to back: their summed cost is measured exactly.

    (Within one, a backend running two buckets at once splits the time between them
    differently from one after another; the sum does not change.)
    """

    world_size: int
    buckets: int
    wire_bytes: float
    time_s: float


def busy_periods(world_size: int, ready_s: Sequence[float], allreduce_s: Sequence[float],
                 wire_bytes: Sequence[float]) -> list[Period]:
    """Split measured buckets (launch order) where the link would have gone idle."""
    pipeline = simulate(ready_s, allreduce_s)
    periods: list[list[int]] = []
    for i, start in enumerate(pipeline.start_s):
        if periods and start <= pipeline.done_s[i - 1] + 1e-9 and ready_s[i] < pipeline.done_s[i - 1]:
            periods[-1].append(i)
        else:
            periods.append([i])
    return [Period(world_size, len(p), float(sum(wire_bytes[i] for i in p)), float(sum(allreduce_s[i] for i in p)))
            for p in periods]


def fit_link(periods: Sequence[Period], alpha_s: float | None = None) -> tuple[float, float] | None:
    """Least-squares (relative) α and B of the ring model over busy periods; None without data.

    ``alpha_s`` given: only B is fitted. When the periods cannot tell α from B (one world size,
    one size of period), α is 0 and B absorbs it.
    """
    rows = [(2 * (p.world_size - 1) * p.buckets, 2 * (p.world_size - 1) / p.world_size * p.wire_bytes, p.time_s)
            for p in periods if p.world_size > 1 and p.time_s > 0 and p.wire_bytes > 0]
    if not rows:
        return None
    a, b, t = (np.asarray(x, dtype=float) for x in zip(*rows))
    w = 1.0 / t
    if alpha_s is not None:
        inv_b = float(np.sum(w * w * b * (t - a * alpha_s)) / np.sum(w * w * b * b))
        return alpha_s, (1.0 / inv_b if inv_b > 0 else math.inf)
    design = np.column_stack([a, b])
    ratio = a / b  # α's weight against B's: they can be told apart only where it varies
    if ratio.max() > 1.5 * ratio.min():
        coef, *_ = np.linalg.lstsq(design * w[:, None], t * w, rcond=None)
        if (coef > 0).all():
            return float(coef[0]), float(1.0 / coef[1])
    inv_b = float(np.sum(w * w * b * t) / np.sum(w * w * b * b))
    return 0.0, 1.0 / inv_b
