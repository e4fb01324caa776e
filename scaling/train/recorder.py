"""The cross-rank reduction of the step records, off the training path.

Each rank resolves its own steps and appends them to its own step file as it goes
(``logs/rank<R>.steps.jsonl``: what a failed job's records are rebuilt from). At a log interval
the loop hands the interval's rows to this rank's ``Recorder`` and goes on training: a thread
sends them to rank 0 on a gloo group of its own (a gather, not an all-gather: rank 0 alone
receives N rows, every other rank sends its one), where they are reduced
(``aggregate.reduce_steps``), appended to steps.jsonl, fed to the sinks and printed as the
progress line. No rank waits at its log step for another rank's bookkeeping, and the training
group never carries a record.

Order: every rank queues the same intervals in the same order, and only this thread issues
collectives on its group, so the gathers match. ``drain()`` (after the last measured step) waits
for every queued interval (the loop then closes the group on every rank together, after a
barrier); ``close()`` (on a failure) stops the thread's writes, so that the failure path's
rebuild from the per-rank files is the last word on steps.jsonl.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

Reduce = Callable[[Sequence[int], np.ndarray], None]
"""Called in rank 0's thread with an interval's steps and ``gathered[rank, step, key]``."""


class Recorder:
    """One thread per rank: gathers and reduces the queued intervals, in order."""

    def __init__(self, group: Any, rank: int, world_size: int, on_gathered: Reduce, timeout_s: float = 60.0,
                 before_gather: Callable[[int], None] | None = None) -> None:
        self.group = group
        self.rank = rank
        self.before_gather = before_gather  # called with the interval's last step (fault injection)
        self.world_size = world_size
        self.on_gathered = on_gathered
        self.timeout_s = timeout_s
        self.gathers = 0
        self.gather_s = 0.0  # wall time in the collective, summed
        self.gather_max_s = 0.0
        self.gather_bytes = 0  # bytes rank 0 received (every other rank: sent), summed
        self.reduce_s = 0.0  # reduction, steps.jsonl, sinks and progress line, summed
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[list[int], torch.Tensor] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._failed_gather = False
        self._thread = threading.Thread(target=self._work, name="scaling-records", daemon=True)
        self._thread.start()

    def submit(self, steps: Sequence[int], rows: Sequence[Sequence[float]]) -> None:
        """Queue one interval: ``rows[step][key]``, this rank's values of ``steps``."""
        self._queue.put((list(steps), torch.tensor(rows, dtype=torch.float64)))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._closed or self._failed_gather:
                continue  # nothing more is gathered: the peers' threads are gone or going
            steps, local = item
            if self.before_gather is not None:
                self.before_gather(steps[-1])
            try:
                t0 = time.perf_counter()
                if self.rank == 0:
                    out = [torch.empty_like(local) for _ in range(self.world_size)]
                    dist.gather(local, out, dst=0, group=self.group)
                else:
                    out = None
                    dist.gather(local, None, dst=0, group=self.group)
                elapsed = time.perf_counter() - t0
            except BaseException as exc:  # a peer died: the main thread sees it in training too
                self._failed_gather = True
                self.error = self.error or exc
                continue
            self.gathers += 1
            self.gather_s += elapsed
            self.gather_max_s = max(self.gather_max_s, elapsed)
            self.gather_bytes += local.numel() * local.element_size() * (self.world_size if out is not None else 1)
            if out is None:
                continue
            t1 = time.perf_counter()
            try:
                with self._lock:
                    if not self._closed:
                        self.on_gathered(steps, torch.stack(out).numpy())
            except BaseException as exc:  # kept for drain(); the gathers go on, so that the peers' match
                self.error = self.error or exc
            self.reduce_s += time.perf_counter() - t1

    def drain(self) -> None:
        """Wait until every queued interval is recorded; raises what the thread met, if anything."""
        self._queue.put(None)
        # Each queued gather is bounded by the group's time-out; past that the thread is stuck.
        self._thread.join(self.timeout_s * (self._queue.qsize() + 2) + 10)
        if self._thread.is_alive():
            raise TimeoutError(f"the records' gather did not finish within {self.timeout_s:.0f} s per interval")
        if self.error is not None:
            raise RuntimeError(f"recording the steps failed: {self.error}") from self.error

    def close(self) -> None:
        """No more writes from the thread (a failure: the per-rank files are rebuilt into steps.jsonl)."""
        with self._lock:
            self._closed = True
        self._queue.put(None)

    def stats(self) -> dict[str, Any]:
        """run.json ``records_gather``: what the live reduction cost this rank, outside its steps."""
        return {"gathers": self.gathers, "gather_s": self.gather_s, "gather_max_s": self.gather_max_s,
                "gather_bytes": self.gather_bytes, "reduce_s": self.reduce_s}
