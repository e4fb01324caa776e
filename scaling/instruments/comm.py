"""Gradient all-reduce timing through a wrapped DDP communication hook.

Keys (per rank, per step): ``comm_s`` (busy time: the union of the
[launch, completion] intervals of all buckets, the part overlapped with
backward included, plus the buffer broadcast before forward),
``comm_exposed_s`` (communication on the critical path: from the moment the
last bucket became ready, i.e. backward compute finished, to the completion of
the last all-reduce, plus any time a blocking hook held backward up, plus the
buffer broadcast), ``comm_sync_s`` (the buffer broadcast alone: DDP's
``broadcast_buffers``, done here by the loop and timed, because DDP's own
runs outside every hook), ``overlap`` (1 - exposed / busy), ``comm_bytes``
(gradient bytes handed to the hook), ``comm_wire_bytes`` (bytes the hook
sent: half for fp16/bf16, the low-rank factors for PowerSGD),
``comm_buckets`` (buckets all-reduced), ``algbw_GBps`` (wire bytes / busy
time of the buckets) and ``busbw_GBps`` (algbw * 2(n-1)/n, the ring
all-reduce factor used by nccl-tests).

Per bucket (``bucket_timeline``, the rows of ``buckets.json``): ``ready_s``
(launch after the start of backward: DDP calls the hook when the bucket is
ready) and ``allreduce_s`` (completion less the later of launch and the
previous bucket's completion: the backend runs one bucket after another, so
queueing behind the previous bucket is not the bucket's own cost).

The wrapper is the documented ``register_comm_hook`` API: DDP calls the hook
when a bucket is ready and waits for the returned future before ``backward()``
returns, so a timestamp at the call is the bucket's launch and one in the
future's callback is its completion.

Collectives outside DDP's hook (FSDP's all-gathers and reduce-scatters,
ZeRO-1's parameter broadcast: ``CommTimer.issue``) are timed at the call
that issues them: busy from the issue to completion, exposed while the
calling thread is held in the call. Per kind of collective (``COMM_KINDS``
in the schema) a step has ``comm_<kind>_s``, ``comm_<kind>_exposed_s`` and
``comm_<kind>_bytes``. ``comm_s`` is the union of every interval of every kind
and of ``comm_sync_s``, never a sum: on CUDA an all-gather and a reduce-scatter
run at once on streams of their own, and summing them would count the same
second twice (and halve algbw/busbw). ``comm_exposed_s`` is the union of the
exposed intervals the same way; the bytes add up to ``comm_bytes``/``comm_wire_bytes``.

On CUDA a mark is an event on the current stream. FSDP issues its collectives
on streams of its own, so the issuing call's hold says nothing of what the
compute stream waited for; for those kinds (``waited_kinds``) the exposed
time is measured instead where the compute stream waits (``waited``: events
on the compute stream just before and after the wait,
``scaling.instruments.sharded``). ZeRO-1's broadcast is waited for by the
optimizer at once, on the compute stream: its issue-to-return interval is
its wait.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from scaling.instruments.clock import Clock


WireCount = Callable[[Any, Any, Callable[[], Any]], tuple[Any, int]]
"""``(state, bucket buffer, call the hook) -> (the hook's future, bytes it sent)``."""


def full_bytes(state: Any, buffer: Any, call: Callable[[], Any]) -> tuple[Any, int]:
    return call(), buffer.numel() * buffer.element_size()


def _half_precision(state: Any, buffer: Any, call: Callable[[], Any]) -> tuple[Any, int]:
    # fp16/bf16 compression all-reduces a 2-byte copy of the bucket.
    return call(), buffer.numel() * 2


def _powersgd(state: Any, buffer: Any, call: Callable[[], Any]) -> tuple[Any, int]:
    # PowerSGD keeps its own count of the elements it all-reduces (the P and Q
    # factors, and the tensors too small to compress); before
    # start_powerSGD_iter it sends the bucket uncompressed and counts nothing.
    before = state.compression_stats()[2] if state is not None else 0
    future = call()
    after = state.compression_stats()[2] if state is not None else 0
    numel = after - before if after > before else buffer.numel()
    return future, int(numel) * buffer.element_size()


def wire_count(hook: str) -> WireCount:
    """How to count the bytes a hook puts on the wire (``comm_wire_bytes``).

    ``hook`` is comm.hook. A user's hook is assumed to send its bucket as it is: its compression, if
    any, is unknown to us.
    """
    return {"fp16": _half_precision, "bf16": _half_precision, "powersgd": _powersgd}.get(hook, full_bytes)

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]


@dataclass
class BucketEvent:
    index: int
    nbytes: int
    wire_bytes: int
    launch: Any
    returned: Any = None
    """When the hook handed back its future: a blocking hook stalls backward until then."""
    done: Any = None
    backward_start: Any = None
    """The start of the backward pass this bucket belongs to (``CommTimer.begin_backward``)."""


@dataclass
class CollectiveEvent:
    """One collective issued outside the DDP hook."""

    kind: str
    nbytes: int
    start: Any
    returned: Any = None
    """When the issuing call returned: the calling thread was held until then."""
    done: Any = None


BUS_FACTORS = {"allreduce": lambda n: 2 * (n - 1) / n, "allgather_fwd": lambda n: (n - 1) / n,
               "allgather_bwd": lambda n: (n - 1) / n, "reducescatter": lambda n: (n - 1) / n,
               "broadcast": lambda n: 1.0}
"""nccl-tests' bus-bandwidth factor of each kind of collective."""


class StepComm(NamedTuple):
    """What one step's communication left: the marks ``CommTimer.resolve`` turns into seconds."""

    events: list[BucketEvent]
    syncs: list[tuple[Any, Any]]
    collectives: list[CollectiveEvent]
    waits: list[tuple[str, Any, Any]]


@dataclass
class CommTimer:
    """Wraps a comm hook; collects one BucketEvent per bucket per step."""

    clock: Clock
    world_size: int
    events: list[BucketEvent] = field(default_factory=list)
    syncs: list[tuple[Any, Any]] = field(default_factory=list)
    """[start, end] marks of the collectives outside the hook in this step (buffer broadcast)."""
    bucket_buffer_bytes: dict[int, int] = field(default_factory=dict)
    """Per bucket index, the bytes of its buffer in the last step taken."""
    kinds: tuple[str, ...] = ("allreduce",)
    """The kinds of collective the strategy issues (schema.STRATEGY_KINDS): the per-kind keys of every step."""
    collectives: list[CollectiveEvent] = field(default_factory=list)
    """This step's collectives issued through ``issue``."""
    waits: list[tuple[str, Any, Any]] = field(default_factory=list)
    """This step's (kind, start, end) marks around the compute stream's waits for a collective (``waited``)."""
    waited_kinds: frozenset[str] = frozenset()
    """The kinds whose exposed time is the measured waits, not the issuing call's hold (FSDP's on CUDA)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _backward_start: Any = None
    _in_backward: bool = False

    def begin_backward(self, mark: Any) -> None:
        """The mark taken as backward starts: bucket ready times are counted from it."""
        self._backward_start = mark
        self._in_backward = True

    @property
    def in_backward(self) -> bool:
        """Whether the step being run is past the start of its backward pass."""
        return self._in_backward

    def issue(self, kind: str, nbytes: int, call: Callable[[], Any]) -> Any:
        """Run ``call`` (it issues one collective of ``kind`` with ``nbytes`` on the wire) and time it.

        ``call`` returns None when it waited for completion itself, or the collective's
        ``Work`` when it did not: its completion is then stamped by the work's future.
        """
        event = CollectiveEvent(kind, nbytes, self.clock.mark())
        work = call()
        event.returned = self.clock.mark()
        if work is None:
            event.done = event.returned
        else:
            self._stamp_done(event, work.get_future())
        with self._lock:
            self.collectives.append(event)
        return work

    def waited(self, kind: str, start: Any, end: Any) -> None:
        """Marks on the compute stream just before and after it waited for a collective of ``kind``."""
        with self._lock:
            self.waits.append((kind, start, end))

    def wrap(self, hook: Hook, count: WireCount | None = None) -> Hook:
        count = count or full_bytes

        # No annotations here: DDP inspects them and rejects the string
        # forms that ``from __future__ import annotations`` would produce.
        def timed_hook(state, bucket):
            buffer = bucket.buffer()
            launch = self.clock.mark()
            future, wire = count(state, buffer, lambda: hook(state, bucket))
            event = self._bucket_launched(bucket.index(), buffer.numel() * buffer.element_size(), wire, launch)
            return self._stamp_done(event, future)

        timed_hook.__name__ = f"timed_{getattr(hook, '__name__', 'hook')}"
        return timed_hook

    def timed_sum_allreduce(self) -> Hook:
        """DDP's plain all-reduce as one timed hook: each bucket summed, nothing else done to it.

        The mean's ``1/N`` is not a pass over the bucket here: the loop folds it into the
        loss (``Parallel.loss_scale``), as DDP's built-in reducer folds it into its copy of
        each gradient into the bucket. ``allreduce_hook`` divides the bucket in a pass of
        its own (1.6 ms for resnet18's 45 MB on one core here, 0.9 % of its step).
        """

        def timed_sum_allreduce(state, bucket):
            buffer = bucket.buffer()
            nbytes = buffer.numel() * buffer.element_size()
            launch = self.clock.mark()
            work = dist.all_reduce(buffer, group=state if state is not None else dist.group.WORLD, async_op=True)
            event = self._bucket_launched(bucket.index(), nbytes, nbytes, launch)
            return self._stamp_done(event, work.get_future(), first=True)

        return timed_sum_allreduce

    def _bucket_launched(self, index: int, nbytes: int, wire: int, launch: Any) -> BucketEvent:
        """A bucket's event, its hook having just returned: recorded for this step."""
        event = BucketEvent(index, nbytes, wire, launch, returned=self.clock.mark(),
                            backward_start=self._backward_start)
        with self._lock:
            self.events.append(event)
        return event

    def _stamp_done(self, event: BucketEvent | CollectiveEvent, future: torch.futures.Future,
                    first: bool = False) -> torch.futures.Future:
        """``future`` with the completion stamped on ``event``; its value, or (``first``) its value's first tensor
        (a collective's work future holds a list)."""

        def completed(fut: torch.futures.Future) -> Any:
            event.done = self.clock.mark()
            return fut.value()[0] if first else fut.value()

        return future.then(completed)

    def sync(self, collective: Callable[[], Any]) -> None:
        """Run a collective outside the hook (it blocks the step) and time it."""
        start = self.clock.mark()
        collective()
        self.syncs.append((start, self.clock.mark()))

    def take_step(self) -> StepComm:
        """The events of the step that just finished; starts a new step."""
        with self._lock:
            events, self.events = self.events, []
            collectives, self.collectives = self.collectives, []
            waits, self.waits = self.waits, []
        syncs, self.syncs = self.syncs, []
        self._in_backward = False
        if events:
            self.bucket_buffer_bytes = {e.index: e.nbytes for e in events}
        return StepComm(events, syncs, collectives, waits)

    def resolve(self, taken: StepComm) -> dict[str, float]:
        events, syncs, collectives, waits = taken
        marks = [start for start, _ in syncs] + [e.launch for e in events] + [c.start for c in collectives]
        if not marks:
            return {"comm_s": 0.0, "comm_exposed_s": 0.0, "comm_sync_s": 0.0, "overlap": 0.0, "comm_bytes": 0.0,
                    "comm_wire_bytes": 0.0, "comm_buckets": 0.0, "algbw_GBps": 0.0, "busbw_GBps": 0.0,
                    **{f"comm_{kind}{suffix}": 0.0 for kind in self.kinds for suffix in ("_s", "_exposed_s", "_bytes")}}
        origin = marks[0]
        since = lambda mark: self.clock.seconds_between(origin, mark)  # noqa: E731
        sync_intervals = [(since(start), since(end)) for start, end in syncs]
        busy: dict[str, list[tuple[float, float]]] = {}
        exposed: dict[str, list[tuple[float, float]]] = {}
        payload: dict[str, float] = {}
        wire: dict[str, float] = {}
        intervals = [(since(e.launch), since(e.done)) for e in events]
        busy["allreduce"] = intervals
        exposed["allreduce"] = []
        if intervals:
            last_ready = max(start for start, _ in intervals)
            last_done = max(end for _, end in intervals)
            # Exposed: after backward's last bucket was ready, plus any time a
            # hook held backward up before returning its future (a blocking
            # hook such as MPI's all-reduce hides nothing behind backward).
            blocking = [(since(e.launch), since(e.returned)) for e in events]
            exposed["allreduce"] = blocking + [(last_ready, last_done)]
        payload["allreduce"] = float(sum(e.nbytes for e in events))
        wire["allreduce"] = float(sum(e.wire_bytes for e in events))
        for kind in {c.kind for c in collectives}:
            mine = [c for c in collectives if c.kind == kind]
            busy[kind] = [(since(c.start), since(c.done)) for c in mine]
            if kind in self.waited_kinds:
                exposed[kind] = [(since(start), since(end)) for k, start, end in waits if k == kind]
            else:
                exposed[kind] = [(since(c.start), since(c.returned)) for c in mine]
            payload[kind] = wire[kind] = float(sum(c.nbytes for c in mine))
        every = lambda by_kind: [i for kind_intervals in by_kind.values() for i in kind_intervals]  # noqa: E731
        transfer = union_length(sorted(every(busy)))
        total = union_length(sorted(every(busy) + sync_intervals))
        on_path = union_length(sorted(every(exposed) + sync_intervals))
        sync_s = union_length(sorted(sync_intervals))
        sent = sum(wire.values())
        n = self.world_size
        algbw = sent / transfer / 1e9 if transfer > 0 else 0.0
        busbw = sum(b * BUS_FACTORS[k](n) for k, b in wire.items()) / transfer / 1e9 if transfer > 0 else 0.0
        out = {
            "comm_s": total,
            "comm_exposed_s": on_path,
            "comm_sync_s": sync_s,
            "overlap": 1.0 - on_path / total if total > 0 else 0.0,
            "comm_bytes": sum(payload.values()),
            "comm_wire_bytes": sent,
            "comm_buckets": float(len(events) + sum(c.kind == "reducescatter" for c in collectives)),
            "algbw_GBps": algbw,
            "busbw_GBps": busbw,
        }
        for kind in self.kinds:
            out[f"comm_{kind}_s"] = union_length(sorted(busy.get(kind, [])))
            out[f"comm_{kind}_exposed_s"] = union_length(sorted(exposed.get(kind, [])))
            out[f"comm_{kind}_bytes"] = wire.get(kind, 0.0)
        return out


def bucket_timeline(clock: Clock, events: list[BucketEvent]) -> list[tuple[int, float, float, int, int]]:
    """One step's buckets in launch order: (index, ready_s, allreduce_s, bytes, wire bytes).

    Empty when backward's start was not marked.
    """
    if not events or any(e.backward_start is None or e.done is None for e in events):
        return []
    rows = []
    previous_done = None
    for event in events:  # the hook is called in launch order
        start = event.launch
        if previous_done is not None and clock.seconds_between(start, previous_done) > 0:
            start = previous_done
        # Completions are stamped by callback threads and two buckets may finish together:
        # a bucket done before the one ahead of it had no time of its own on the link.
        own = max(0.0, clock.seconds_between(start, event.done))
        rows.append((event.index, clock.seconds_between(event.backward_start, event.launch), own, event.nbytes,
                     event.wire_bytes))
        if previous_done is None or clock.seconds_between(previous_done, event.done) > 0:
            previous_done = event.done
    return rows


BUCKET_COLUMNS = ("index", "ready_s", "allreduce_s", "bytes", "wire_bytes")


def timeline_array(steps: list[list[tuple[int, float, float, int, int]]]) -> np.ndarray:
    """Measured steps' timelines as one [step, bucket, column] array, the same shape on every rank.

    The bucket count is that of the last step (DDP rebuilds its buckets once, before the measured
    steps); a step with another count is left NaN.
    """
    buckets = len(steps[-1]) if steps else 0
    out = np.full((len(steps), buckets, len(BUCKET_COLUMNS)), np.nan)
    for i, rows in enumerate(steps):
        if len(rows) == buckets and buckets:
            out[i] = np.asarray(rows, dtype=float)
    return out


def bucket_records(per_rank: np.ndarray) -> list[dict[str, float | int]]:
    """The rows of buckets.json from every rank's ``timeline_array`` ([rank, step, bucket, column]).

    ``ready_s``: median over steps of the mean over ranks. ``allreduce_s``: median over steps of the
    shortest duration over ranks, the one seen by the rank that launched the bucket last (no waiting
    for late peers: the cost of the transfer itself); ``allreduce_max_s``: the longest, waiting included.
    """
    if per_rank.size == 0 or per_rank.shape[2] == 0:
        return []
    complete = ~np.isnan(per_rank).any(axis=(0, 2, 3))
    if not complete.any():
        return []
    steps = per_rank[:, complete]
    col = {name: i for i, name in enumerate(BUCKET_COLUMNS)}
    first = steps[0, 0]
    ready = np.median(steps[..., col["ready_s"]].mean(axis=0), axis=0)
    last_arrival = np.median(steps[..., col["allreduce_s"]].min(axis=0), axis=0)
    slowest = np.median(steps[..., col["allreduce_s"]].max(axis=0), axis=0)
    return [{"index": int(first[b, col["index"]]), "bytes": int(first[b, col["bytes"]]),
             "wire_bytes": int(first[b, col["wire_bytes"]]), "ready_s": float(ready[b]),
             "allreduce_s": float(last_arrival[b]), "allreduce_max_s": float(slowest[b])}
            for b in range(steps.shape[2])]


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
