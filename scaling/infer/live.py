"""The server scenario served for real: Poisson queries in real time, a dynamic batcher, the model on its device.

A generator thread issues each query at its seeded arrival time into a queue.
The batcher, on the calling thread, takes the oldest waiting query, then waits
for more until ``max_batch`` wait or the oldest has waited ``timeout_s`` since
it was issued (a server that was busy sends what has piled up as soon as it is
free), pads the batch to the smallest measured batch size that holds it (fixed
shapes, as the search assumes), runs the model and synchronises the device.

A query's latency is its batch's completion minus its scheduled arrival, so a
generator that falls behind counts against the server, as a request accepted
late does. Each batch's service time in the loop is its completion minus the
later of the previous completion and the moment the batcher's rules let it go
(its oldest query's time-out, or its ``max_batch``-th query issued): what the
simulated queue calls a service time, with everything the loop adds to the
forward (hand-off through the queue, waking the batcher, the interpreter lock
shared with the generator, the loop's own bookkeeping).

Two uses:

* ``service_times``: one batch size served with more queries than it can
  serve, so the batcher always finds a full batch waiting: the service times
  and the generator's lateness the search simulates on (``scaling.infer.server_scenario``).
* ``replay``: a rate the search chose, served with the search's own arrivals.
  Keys: ``rate_qps``, ``queries``, ``duration_s`` (first arrival to last
  completion), ``p50_s``, ``p99_s``, ``max_s``, ``mean_batch``, ``budget_met``
  (p99 <= budget), ``issue_lag_p99_s`` (how late the generator issued, counted
  in the latencies), ``service_s`` (per padded batch size: ``batches``, ``p50``,
  ``p99`` of the service times in the loop, against the searched ones).
"""

from __future__ import annotations

import bisect
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scaling.infer import server_scenario
from scaling.infer.measure import Server

LEAD_S = 0.05
"""The generator starts this long after the inputs are ready, so that the first arrival is not already late."""
SWITCH_INTERVAL_S = 0.0005
"""Python hands the interpreter lock between threads every 5 ms by default: a query arriving while the
batcher runs Python code could wait that long to be issued. During serving, 0.5 ms."""
OVERLOAD = 1.5
"""``service_times`` issues queries this many times faster than the single-stream median serves them."""


@dataclass(frozen=True)
class Served:
    """What one live run recorded (seconds)."""

    latency_s: np.ndarray
    """Per query: its batch's completion minus its scheduled arrival."""
    issue_lag_s: np.ndarray
    """Per query: issued minus scheduled arrival."""
    batches: list[int]
    """Queries per batch, in the order sent."""
    padded: list[int]
    """The batch size each batch ran at."""
    service_s: np.ndarray
    """Per batch: completion minus the later of the previous completion and the moment the batch could go."""


def _issue(arrive_at: np.ndarray, waiting: queue.SimpleQueue, issued_at: np.ndarray) -> None:
    for i, due in enumerate(arrive_at):
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        issued_at[i] = time.perf_counter()
        waiting.put(i)


def serve(server: Server, sizes: Sequence[int], arrive_s: np.ndarray, max_batch: int, timeout_s: float) -> Served:
    """Serve queries arriving ``arrive_s`` seconds after the start."""
    shapes = sorted(sizes)
    inputs = {size: server.batch(size) for size in shapes[:bisect.bisect_left(shapes, max_batch) + 1]}
    queries = len(arrive_s)
    waiting: queue.SimpleQueue[int] = queue.SimpleQueue()
    issued_at = np.zeros(queries)
    done_at = np.zeros(queries)
    batches: list[list[int]] = []
    padded: list[int] = []
    batch_done: list[float] = []
    pending: deque[int] = deque()
    server.sync()
    arrive_at = time.perf_counter() + LEAD_S + np.asarray(arrive_s)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    generator = threading.Thread(target=_issue, args=(arrive_at, waiting, issued_at), daemon=True)
    generator.start()
    try:
        served = 0
        while served < queries:
            if not pending:
                pending.append(waiting.get())
            deadline = issued_at[pending[0]] + timeout_s  # the server's clock starts when a query reaches it
            while len(pending) < max_batch:
                try:
                    pending.append(waiting.get_nowait())
                    continue
                except queue.Empty:
                    pass
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    pending.append(waiting.get(timeout=remaining))
                except queue.Empty:
                    break
            take = [pending.popleft() for _ in range(min(max_batch, len(pending)))]
            size = shapes[bisect.bisect_left(shapes, len(take))]
            server.forward(inputs[size])
            server.sync()
            batch_done.append(time.perf_counter())
            batches.append(take)
            padded.append(size)
            served += len(take)
    finally:
        sys.setswitchinterval(previous)
    generator.join()
    service = np.empty(len(batches))
    free_at = -np.inf
    for n, (take, done) in enumerate(zip(batches, batch_done)):
        done_at[take] = done
        full = take[0] + max_batch - 1  # queries are taken in the order issued
        ready = issued_at[take[0]] + timeout_s
        if full < queries:
            ready = min(ready, issued_at[full])
        service[n] = done - max(free_at, ready)
        free_at = done
    return Served(done_at - arrive_at, issued_at - arrive_at, [len(t) for t in batches], padded, service)


def service_times(server: Server, size: int, batches: int, single_stream_s: float, timeout_s: float,
                  seed: int) -> tuple[list[float], list[float]]:
    """Batches of ``size`` served back to back by the serving loop: each one's service time, and how late the
    generator issued one query per batch.

    Queries arrive (Poisson) ``OVERLOAD`` times faster than batches of ``size``
    taking ``single_stream_s`` serve them, so once the queue has filled a full
    batch is always waiting: the last ``batches`` batches are kept (the first,
    and any sent part-full by a time-out while the queue filled, are not).
    """
    rate = OVERLOAD * size / single_stream_s
    run = serve(server, [size], server_scenario.arrivals(size * (batches + 1), rate, seed), size, timeout_s)
    return [float(s) for s in run.service_s[-batches:]], [float(lag) for lag in run.issue_lag_s[size::size]]


def _service_summary(run: Served) -> dict[str, dict[str, float]]:
    out = {}
    for size in sorted(set(run.padded)):
        times = run.service_s[np.asarray(run.padded) == size]
        out[str(size)] = {"batches": int(len(times)), "p50": float(np.percentile(times, 50)),
                          "p99": float(np.percentile(times, 99))}
    return out


def replay(server: Server, sizes: Sequence[int], rate_qps: float, queries: int, max_batch: int, timeout_s: float,
           seed: int, budget_s: float) -> dict[str, Any]:
    """One rate served live: the search's arrivals (``queries_at`` queries), the batcher, the model."""
    count = server_scenario.queries_at(rate_qps, queries, budget_s)
    arrive_s = server_scenario.arrivals(count, rate_qps, seed)
    run = serve(server, sizes, arrive_s, max_batch, timeout_s)
    latency = run.latency_s
    p99 = float(np.percentile(latency, 99))
    return {"rate_qps": rate_qps, "queries": count, "duration_s": float(np.max(arrive_s + latency) - arrive_s[0]),
            "p50_s": float(np.percentile(latency, 50)), "p99_s": p99, "max_s": float(latency.max()),
            "mean_batch": float(np.mean(run.batches)), "budget_met": p99 <= budget_s,
            "issue_lag_p99_s": float(np.percentile(run.issue_lag_s, 99)), "service_s": _service_summary(run)}
