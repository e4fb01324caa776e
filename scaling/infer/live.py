"""The server scenario served for real: Poisson queries in real time, a dynamic batcher, the model on its device.

The search (``scaling.infer.server``) finds its rate on a simulated queue; this
replays a rate live. A generator thread issues each query at its seeded
arrival time (the very stream the search simulated, stretched to the rate)
into a queue. The batcher, on the calling thread, takes the oldest waiting
query, then waits for more until ``max_batch`` wait or the oldest has waited
``timeout_s`` since it was issued (a server that was busy sends what has piled
up as soon as it is free), pads the batch to the smallest measured batch size that holds it (fixed
shapes, as the search assumes), runs the model and synchronises the device.

A query's latency is its batch's completion minus its scheduled arrival, so a
generator that falls behind counts against the server, as a request accepted
late does; ``issue_lag_p99_s`` says by how much it fell behind.

Keys of one replayed rate: ``rate_qps``, ``queries``, ``duration_s`` (first
arrival to last completion), ``p50_s``, ``p99_s``, ``max_s``, ``mean_batch``,
``budget_met`` (p99 <= budget), ``issue_lag_p99_s``.
"""

from __future__ import annotations

import bisect
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from scaling.infer import server as serving
from scaling.infer.measure import Server

LEAD_S = 0.05
"""The generator starts this long after the inputs are ready, so that the first arrival is not already late."""
SWITCH_INTERVAL_S = 0.0005
"""Python hands the interpreter lock between threads every 5 ms by default: a query arriving while the
batcher runs Python code could wait that long to be issued. During a replay, 0.5 ms."""


def _issue(arrive_at: np.ndarray, waiting: queue.SimpleQueue, issued_at: np.ndarray) -> None:
    for i, due in enumerate(arrive_at):
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        issued_at[i] = time.perf_counter()
        waiting.put(i)


def serve(server: Server, sizes: Sequence[int], arrive_s: np.ndarray, max_batch: int,
          timeout_s: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Serve queries arriving ``arrive_s`` seconds after the start.

    Returns per query the latency (completion minus scheduled arrival) and the
    issue lag (issue minus scheduled arrival), and the size of each batch sent.
    """
    shapes = sorted(sizes)
    inputs = {size: server.batch(size) for size in shapes[:bisect.bisect_left(shapes, max_batch) + 1]}
    queries = len(arrive_s)
    waiting: queue.SimpleQueue[int] = queue.SimpleQueue()
    issued_at = np.zeros(queries)
    done_at = np.zeros(queries)
    batches: list[int] = []
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
            server.forward(inputs[shapes[bisect.bisect_left(shapes, len(take))]])
            server.sync()
            done_at[take] = time.perf_counter()
            batches.append(len(take))
            served += len(take)
    finally:
        sys.setswitchinterval(previous)
    generator.join()
    return done_at - arrive_at, issued_at - arrive_at, batches


def replay(server: Server, sizes: Sequence[int], rate_qps: float, queries: int, max_batch: int, timeout_s: float,
           seed: int, budget_s: float) -> dict[str, Any]:
    """One rate served live: the search's arrivals (``queries_at`` queries), the batcher, the model."""
    count = serving.queries_at(rate_qps, queries, budget_s)
    arrive_s = serving.arrivals(count, rate_qps, seed)
    latency, lag, batches = serve(server, sizes, arrive_s, max_batch, timeout_s)
    p99 = float(np.percentile(latency, 99))
    return {"rate_qps": rate_qps, "queries": count, "duration_s": float(np.max(arrive_s + latency) - arrive_s[0]),
            "p50_s": float(np.percentile(latency, 50)), "p99_s": p99, "max_s": float(latency.max()),
            "mean_batch": float(np.mean(batches)), "budget_met": p99 <= budget_s,
            "issue_lag_p99_s": float(np.percentile(lag, 99))}
