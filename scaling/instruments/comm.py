"""Gradient all-reduce timing through a wrapped DDP communication hook.

Keys (per rank, per step): ``comm_s`` (busy time: the union of the
[launch, completion] intervals of all buckets, the part overlapped with
backward included), ``comm_exposed_s`` (from the moment the last bucket became
ready, i.e. backward compute finished, to the completion of the last
all-reduce, plus any time a blocking hook held backward up), ``overlap``
(1 - exposed / busy), ``comm_bytes`` (gradient bytes handed to the hook),
``comm_buckets`` (buckets all-reduced), ``algbw_GBps`` (comm_bytes / comm_s)
and ``busbw_GBps`` (algbw * 2(n-1)/n, the ring all-reduce factor used by
nccl-tests). With a compressing hook (fp16, bf16, powersgd) fewer bytes cross
the wire than ``comm_bytes``: the bandwidths are then effective gradient
bandwidths, not link bandwidths.

The wrapper is the documented ``register_comm_hook`` API: DDP calls the hook
when a bucket is ready and waits for the returned future before ``backward()``
returns, so a timestamp at the call is the bucket's launch and one in the
future's callback is its completion.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from scaling.instruments.clock import Clock

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]


@dataclass
class BucketEvent:
    index: int
    nbytes: int
    launch: Any
    returned: Any = None
    """When the hook handed back its future: a blocking hook stalls backward until then."""
    done: Any = None


@dataclass
class CommTimer:
    """Wraps a comm hook; collects one BucketEvent per bucket per step."""

    clock: Clock
    world_size: int
    events: list[BucketEvent] = field(default_factory=list)
    bucket_buffer_bytes: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, hook: Hook) -> Hook:
        # No annotations here: DDP inspects them and rejects the string
        # forms that ``from __future__ import annotations`` would produce.
        def timed_hook(state, bucket):
            buffer = bucket.buffer()
            event = BucketEvent(bucket.index(), buffer.numel() * buffer.element_size(), self.clock.mark())
            with self._lock:
                self.events.append(event)
                self.bucket_buffer_bytes[event.index] = event.nbytes

            def completed(fut: torch.futures.Future) -> Any:
                event.done = self.clock.mark()
                return fut.value()

            future = hook(state, bucket)
            event.returned = self.clock.mark()
            return future.then(completed)

        timed_hook.__name__ = f"timed_{getattr(hook, '__name__', 'hook')}"
        return timed_hook

    def take_step(self) -> list[BucketEvent]:
        """The events of the step that just finished; starts a new step."""
        with self._lock:
            events, self.events = self.events, []
        return events

    def resolve(self, events: list[BucketEvent]) -> dict[str, float]:
        if not events:
            return {"comm_s": 0.0, "comm_exposed_s": 0.0, "overlap": 0.0, "comm_bytes": 0.0,
                    "comm_buckets": 0.0, "algbw_GBps": 0.0, "busbw_GBps": 0.0}
        origin = events[0].launch
        since = lambda mark: self.clock.seconds_between(origin, mark)  # noqa: E731
        intervals = sorted((since(e.launch), since(e.done)) for e in events)
        busy = union_length(intervals)
        last_ready = max(start for start, _ in intervals)
        last_done = max(end for _, end in intervals)
        # Exposed: after backward's last bucket was ready, plus any time a hook
        # held backward up before returning its future (a blocking hook such
        # as MPI's all-reduce hides nothing behind backward).
        blocking = [(since(e.launch), since(e.returned)) for e in events]
        exposed = union_length(sorted(blocking + [(last_ready, last_done)]))
        nbytes = float(sum(e.nbytes for e in events))
        algbw = nbytes / busy / 1e9 if busy > 0 else 0.0
        n = self.world_size
        return {
            "comm_s": busy,
            "comm_exposed_s": exposed,
            "overlap": 1.0 - exposed / busy if busy > 0 else 0.0,
            "comm_bytes": nbytes,
            "comm_buckets": float(len(events)),
            "algbw_GBps": algbw,
            "busbw_GBps": algbw * 2 * (n - 1) / n,
        }


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by closed intervals sorted by start."""
    total = 0.0
    current_start, current_end = None, None
    for start, end in intervals:
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total
