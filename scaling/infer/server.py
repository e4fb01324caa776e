"""MLPerf's server scenario: Poisson arrivals, a dynamic batcher, and the largest rate within a p99 budget.

Plain Python and numpy, so that a result can be replayed from ``infer.json``
alone. The queue is simulated on the measured service times: a batch of ``k``
queries is padded to the smallest measured batch size ``>= k`` (as a server with
fixed batch shapes does) and takes one of that size's recorded latencies, drawn
with a seeded generator. Arrivals are one seeded Poisson stream, stretched to
each tried rate, so every rate sees the same pattern of gaps.

The batcher sends when ``max_batch`` queries wait, or when the oldest has
waited ``timeout_s``, or, when the server was busy, as soon as it is free (at
most ``max_batch`` queries).

The simulation knows only the service times: what serving adds (issuing
queries, waking threads, a machine shared with other work) is not in it.
``scaling.infer.live`` serves the answer and the next rate up for real, with
these same arrivals and batcher rules, and says whether the answer holds.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SEARCH_STEP = 0.02
"""The search stops when the rate that meets the budget and the one that does not are 2% apart."""
BUDGETS_LONG = 100
"""A tried rate runs for at least 100 latency budgets of arrivals (and at least ``queries`` queries).

A short run hides overload: a backlog growing at ``rate - capacity`` adds
``duration x (rate / capacity - 1)`` of waiting by the end, so a rate 2% above
capacity shows only after 50 budgets. (MLPerf LoadGen asks for 600 s.)
"""
MAX_DOUBLINGS = 40


@dataclass(frozen=True)
class ServiceTimes:
    """Recorded latencies of one query per batch size (seconds)."""

    samples_s: Mapping[int, Sequence[float]]

    def padded(self, k: int) -> int:
        sizes = sorted(self.samples_s)
        return sizes[bisect.bisect_left(sizes, k)]

    def capacity_qps(self, max_batch: int) -> float:
        """The most queries per second the server can finish: the best batch's size over its median time."""
        return max(b / float(np.median(s)) for b, s in self.samples_s.items() if b <= max_batch)


@dataclass(frozen=True)
class Trial:
    rate_qps: float
    p99_s: float
    mean_batch: float


def arrivals(queries: int, rate_qps: float, seed: int) -> np.ndarray:
    gaps = np.random.default_rng(seed).exponential(1.0, queries)
    return np.cumsum(gaps) / rate_qps


def simulate(service: ServiceTimes, rate_qps: float, queries: int, max_batch: int, timeout_s: float,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query latency (s), and the size of each batch sent."""
    arrive = arrivals(queries, rate_qps, seed)
    draw = np.random.default_rng(seed + 1)
    latency = np.empty(queries)
    batches = []
    free_at, i = 0.0, 0
    while i < queries:
        full = i + max_batch - 1
        ready = arrive[i] + timeout_s if full >= queries else min(arrive[i] + timeout_s, arrive[full])
        send = max(free_at, ready)
        j = min(int(np.searchsorted(arrive, send, side="right")), i + max_batch)
        samples = service.samples_s[service.padded(j - i)]
        done = send + float(samples[int(draw.integers(len(samples)))])
        latency[i:j] = done - arrive[i:j]
        batches.append(j - i)
        free_at, i = done, j
    return latency, np.asarray(batches)


def queries_at(rate_qps: float, queries: int, budget_s: float) -> int:
    return max(queries, int(np.ceil(rate_qps * BUDGETS_LONG * budget_s)))


def trial(service: ServiceTimes, rate_qps: float, queries: int, max_batch: int, timeout_s: float, seed: int,
          budget_s: float) -> Trial:
    """One rate: ``queries_at`` its queries through the batcher."""
    latency, batches = simulate(service, rate_qps, queries_at(rate_qps, queries, budget_s), max_batch, timeout_s, seed)
    return Trial(rate_qps, float(np.percentile(latency, 99)), float(batches.mean()))


def search(service: ServiceTimes, budget_s: float, queries: int, max_batch: int, timeout_s: float,
           seed: int) -> dict:
    """The largest rate whose p99 meets ``budget_s``, by bisection between a rate that meets it and one that does not.

    ``rate_qps`` is None when even a trickle of queries misses the budget (one
    query's time-out and service exceed it). ``next_rate_qps`` is the nearest
    rate tried above it, which misses.
    """
    run = lambda rate: trial(service, rate, queries, max_batch, timeout_s, seed, budget_s)  # noqa: E731
    capacity = service.capacity_qps(max_batch)
    low, high = run(capacity / 1000), run(2 * capacity)
    if low.p99_s > budget_s:
        return {"rate_qps": None, "p99_s": None, "next_rate_qps": low.rate_qps, "next_p99_s": low.p99_s,
                "capacity_qps": capacity}
    for _ in range(MAX_DOUBLINGS):
        if high.p99_s > budget_s:
            break
        low, high = high, run(2 * high.rate_qps)
    else:
        raise RuntimeError(f"no overload found up to {high.rate_qps:.3g} queries/s; the service times look wrong")
    while high.rate_qps / low.rate_qps > 1 + SEARCH_STEP:
        middle = run(float(np.sqrt(low.rate_qps * high.rate_qps)))
        low, high = (middle, high) if middle.p99_s <= budget_s else (low, middle)
    return {"rate_qps": low.rate_qps, "p99_s": low.p99_s, "queries_at_rate": queries_at(low.rate_qps, queries, budget_s),
            "mean_batch": low.mean_batch,
            "next_rate_qps": high.rate_qps, "next_p99_s": high.p99_s, "capacity_qps": capacity}
