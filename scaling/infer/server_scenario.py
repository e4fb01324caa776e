"""MLPerf's server scenario: Poisson arrivals, a dynamic batcher, and the largest rate within a p99 budget.

Plain Python and numpy, so that a result can be replayed from ``infer.json``
alone. The queue is simulated on service times measured in the serving loop
itself (``scaling.infer.live.service_times``: a batch's completion minus the
later of the previous completion and the moment it could go, so the loop's own
costs are in them): a batch of ``k`` queries is padded to the smallest measured
batch size ``>= k`` (as a server with fixed batch shapes does) and takes one of
that size's service times, drawn with a seeded generator. Each query reaches
the batcher late by one of the generator's measured lags (its latency still
counts from its scheduled arrival, as served live). Arrivals are one seeded
Poisson stream, stretched to each tried rate, so every rate sees the same
pattern of gaps, and the live replay serves that same stream.

The batcher sends when ``max_batch`` queries wait, or when the oldest has
waited ``timeout_s``, or, when the server was busy, as soon as it is free (at
most ``max_batch`` queries).

Robust to a stray slow sample: each size's slowest service time is drawn as
its second slowest (one slow forward in ``n`` cannot say how often it comes,
and drawn as ``1/n`` of every simulated batch it alone would set the p99),
and a rate's p99 is the median over ``DRAWS`` simulations with different
service draws on the same arrivals.

The rates tried lie on a grid around the capacity, ``capacity x (1 +
step)**(k - 1/2)``: the answer is the largest of them that meets the budget and
the next one up misses it, so the two are ``step`` apart whatever the machine
measured. The capacity itself falls mid-way between two grid rates: there the
queue is critically loaded and its p99 is set by the run's length and by
noise, so no tried rate sits on it; the grid rate above it overloads the
server by ``(1 + step)**(1/2) - 1`` and misses any budget.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

BUDGETS_LONG = 100
"""A tried rate runs for at least 100 latency budgets of arrivals (and at least ``queries`` queries).

A short run hides overload: a backlog growing at ``rate - capacity`` adds
``duration x (rate / capacity - 1)`` of waiting by the end, so a rate 2% above
capacity shows only after 50 budgets. (MLPerf LoadGen asks for 600 s.)
"""
DRAWS = 5
"""Simulations per rate, each with its own service-time draws on the same arrivals; the p99 is their median."""
TRICKLE = 1e-3
"""The lowest rate tried, as a share of the capacity: every query alone, waiting its time-out and one forward."""
MAX_OVER_CAPACITY = 4.0
"""A rate this many times the capacity that still meets the budget means the service times are wrong."""


def _without_stray_maximum(samples: Sequence[float]) -> np.ndarray:
    values = np.sort(np.asarray(samples, dtype=float))
    if len(values) > 1:
        values[-1] = values[-2]
    return values


@dataclass(frozen=True)
class ServiceTimes:
    """Service times of one batch per batch size (seconds), and the generator's lateness per query."""

    samples_s: Mapping[int, Sequence[float]]
    issue_lag_s: Sequence[float] = (0.0,)
    _drawn: dict[int, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_drawn", {b: _without_stray_maximum(s) for b, s in self.samples_s.items()})

    def padded(self, k: int) -> int:
        sizes = sorted(self.samples_s)
        return sizes[bisect.bisect_left(sizes, k)]

    def drawn(self, size: int) -> np.ndarray:
        """What the simulation draws from for ``size``: its samples, the slowest one set to the second slowest."""
        return self._drawn[size]

    def capacity_qps(self, max_batch: int) -> float:
        """The most queries per second the server can finish: the best batch's size over its median time."""
        return max(b / float(np.median(s)) for b, s in self.samples_s.items() if b <= max_batch)


@dataclass(frozen=True)
class Trial:
    rate_qps: float
    p99_s: float
    mean_batch: float

    def meets(self, budget_s: float) -> bool:
        return self.p99_s <= budget_s


def arrivals(queries: int, rate_qps: float, seed: int) -> np.ndarray:
    gaps = np.random.default_rng(seed).exponential(1.0, queries)
    return np.cumsum(gaps) / rate_qps


def simulate(service: ServiceTimes, rate_qps: float, queries: int, max_batch: int, timeout_s: float,
             seed: int, draw: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per query latency (s), and the size of each batch sent. ``draw`` picks the service-time draws."""
    arrive = arrivals(queries, rate_qps, seed)
    rng = np.random.default_rng([seed + 1, draw])
    lags = np.asarray(service.issue_lag_s, dtype=float)
    seen = np.maximum.accumulate(arrive + lags[rng.integers(len(lags), size=queries)])  # issued in order
    latency = np.empty(queries)
    batches = []
    free_at, i = 0.0, 0
    while i < queries:
        full = i + max_batch - 1
        ready = seen[i] + timeout_s if full >= queries else min(seen[i] + timeout_s, seen[full])
        send = max(free_at, ready)
        j = min(int(np.searchsorted(seen, send, side="right")), i + max_batch)
        samples = service.drawn(service.padded(j - i))
        done = send + float(samples[int(rng.integers(len(samples)))])
        latency[i:j] = done - arrive[i:j]
        batches.append(j - i)
        free_at, i = done, j
    return latency, np.asarray(batches)


def queries_at(rate_qps: float, queries: int, budget_s: float) -> int:
    return max(queries, int(np.ceil(rate_qps * BUDGETS_LONG * budget_s)))


def trial(service: ServiceTimes, rate_qps: float, queries: int, max_batch: int, timeout_s: float, seed: int,
          budget_s: float) -> Trial:
    """One rate: ``queries_at`` its queries through the batcher, ``DRAWS`` times; the median p99."""
    count = queries_at(rate_qps, queries, budget_s)
    runs = [simulate(service, rate_qps, count, max_batch, timeout_s, seed, d) for d in range(DRAWS)]
    return Trial(rate_qps, float(np.median([np.percentile(lat, 99) for lat, _ in runs])),
                 float(np.mean([batches.mean() for _, batches in runs])))


def search(service: ServiceTimes, budget_s: float, queries: int, max_batch: int, timeout_s: float,
           seed: int, step: float) -> dict:
    """The largest rate ``capacity x (1 + step)**(k - 1/2)`` whose p99 meets ``budget_s``.

    From just below the capacity down (or up, when that meets the budget) in
    doubling strides until the budget changes side, then bisection over ``k``.
    ``rate_qps`` is None when even a trickle of queries misses the budget (one
    query's time-out and service exceed it). ``next_rate_qps`` is the next rate
    up, ``(1 + step)`` times the answer, which misses.
    """
    capacity = service.capacity_qps(max_batch)
    tried: dict[int, Trial] = {}

    def share(k: int) -> float:
        return (1 + step) ** (k - 0.5)

    def run(k: int) -> Trial:
        if k not in tried:
            tried[k] = trial(service, capacity * share(k), queries, max_batch, timeout_s, seed, budget_s)
        return tried[k]

    lowest = 1 - math.ceil(math.log(1 / TRICKLE) / math.log(1 + step))
    if run(0).meets(budget_s):
        low, stride = 0, 1
        while run(low + stride).meets(budget_s):
            low += stride
            stride *= 2
            if share(low) > MAX_OVER_CAPACITY:
                raise RuntimeError(f"{run(low).rate_qps:.3g} queries/s meets the budget, over {MAX_OVER_CAPACITY:g}x "
                                   f"the capacity ({capacity:.3g} queries/s); the service times look wrong")
        high = low + stride
    else:
        high, stride = 0, 1
        while not run(max(lowest, high - stride)).meets(budget_s):
            if high - stride <= lowest:
                miss = run(lowest)
                return {"rate_qps": None, "p99_s": None, "next_rate_qps": miss.rate_qps, "next_p99_s": miss.p99_s,
                        "capacity_qps": capacity, "step": step}
            high -= stride
            stride *= 2
        low = max(lowest, high - stride)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if run(middle).meets(budget_s) else (low, middle)
    answer, above = run(low), run(high)
    return {"rate_qps": answer.rate_qps, "p99_s": answer.p99_s, "mean_batch": answer.mean_batch,
            "queries_at_rate": queries_at(answer.rate_qps, queries, budget_s),
            "next_rate_qps": above.rate_qps, "next_p99_s": above.p99_s, "capacity_qps": capacity, "step": step,
            "capacity_share": share(low)}
