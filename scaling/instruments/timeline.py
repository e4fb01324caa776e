"""The per-rank side of ``timeline.json`` (``scaling.records.chrome_trace``): a few measured steps' own marks.

Nothing is added to a measured step: the marks are those the step timer and the communication timer take
anyway (``StepMarks``, ``StepComm``); when a step is resolved into seconds (``Trainer._resolve_pending``, at
the log interval on CUDA), the first ``instrument.timeline_steps`` measured steps are also turned into times on
this rank's host clock and kept. Before the measured steps and after them, every rank leaves ``ROUNDS``
barriers on the bookkeeping group and reads its clock (the alignment); at the end, one gather of the event
counts and the exposed times decides which ranks are written (the size bound), one more gathers their steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from scaling.instruments.clock import Clock
from scaling.instruments.comm import StepComm
from scaling.instruments.timing import StepMarks
from scaling.records import chrome_trace

ROUNDS = 5
"""Barriers per alignment: the offset is the median over them."""


class TimelineRecorder:
    def __init__(self, clock: Clock, device: torch.device, steps: int, first_step: int,
                 waited_kinds: Callable[[], frozenset[str]] = frozenset) -> None:
        self.clock = clock
        self.waited_kinds = waited_kinds
        """The kinds of collective whose exposed time is the compute stream's measured waits (CommTimer's)."""
        self.device = device
        self.first_step = first_step
        self.last_step = first_step + steps
        self._taken: list[tuple[int, StepMarks, StepComm, dict[str, float]]] = []
        self.steps: list[dict[str, Any]] = []
        self.begin: list[float] = []
        self.end: list[float] = []
        self._anchor: tuple[Any, float] | None = None
        self.cost_s: dict[str, float] = {}
        """This rank's seconds in the alignments and in the gather, outside the measured steps (otherData.cost_s)."""

    def wants(self, step: int) -> bool:
        return self.first_step <= step < self.last_step

    def _anchor_now(self) -> None:
        """CUDA: an event on an idle stream and the host clock just after it completed (events have no epoch)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            event = self.clock.mark()
            event.synchronize()
            self._anchor = (event, time.perf_counter())

    def host(self, mark: Any) -> float:
        """A mark as seconds of this rank's host clock (``time.perf_counter``)."""
        if self._anchor is None:
            return float(mark)
        event, at = self._anchor
        return at + self.clock.seconds_between(event, mark)

    def align(self, when: str, group: Any, world_size: int) -> None:
        """Leave ``ROUNDS`` barriers with every rank, reading the host clock at each exit."""
        began = time.perf_counter()
        if when == "begin":
            self._anchor_now()
        exits = self.begin if when == "begin" else self.end
        for _ in range(ROUNDS):
            if world_size > 1:
                dist.barrier(group=group)
            exits.append(time.perf_counter())
        self.cost_s[f"align_{when}"] = time.perf_counter() - began

    def add(self, step: int, marks: StepMarks, comm: StepComm, values: dict[str, float]) -> None:
        """Keep one resolved step's marks (a reference: they are turned into times at the end, in ``gather``)."""
        self._taken.append((step, marks, comm, values))

    def _convert(self, step: int, marks: StepMarks, comm: StepComm, values: dict[str, float]) -> None:
        """One step's phase boundaries, buckets, broadcasts and collectives in host seconds."""
        host = self.host
        phases = [host(marks.start), *(host(marks.marks[p]) for p in chrome_trace.PHASES)]
        buckets = [[e.index, host(e.launch), host(e.returned), host(e.done), e.nbytes]
                   for e in comm.events if e.done is not None and e.returned is not None]
        collectives = [[c.kind, host(c.start), host(c.returned), host(c.done), c.nbytes]
                       for c in comm.collectives if c.done is not None and c.returned is not None]
        # Their exposed parts, as CommTimer.resolve counts them: the calling thread held in the call, or, for the
        # kinds waited for on the compute stream (FSDP's on CUDA), the waits.
        waited = self.waited_kinds()
        exposed = [[kind, start, returned] for kind, start, returned, _, _ in collectives if kind not in waited]
        exposed += [[kind, host(a), host(b)] for kind, a, b in comm.waits if kind in waited]
        self.steps.append({"step": step, "phases": phases, "buckets": buckets,
                           "syncs": [[host(a), host(b)] for a, b in comm.syncs], "collectives": collectives,
                           "collectives_exposed": exposed,
                           "values": {k: float(v) for k, v in values.items()}})

    def gather(self, ctx: Any, info: dict[str, Any]) -> dict[str, Any] | None:
        """Collective (every rank calls it): the trace on rank 0, None elsewhere."""
        began = time.perf_counter()
        for taken in self._taken:
            self._convert(*taken)
        self._taken.clear()
        exposed = [s["values"].get("comm_exposed_s", 0.0) for s in self.steps]
        own = [s["values"]["step_s"] for s in self.steps]
        small = {"host": ctx.hostnames[ctx.rank], "events": sum(chrome_trace.events_of(s) for s in self.steps),
                 "exposed": exposed, "step": own, "begin": self.begin, "end": self.end}
        every = ctx.gather_object(small) if ctx.world_size > 1 else [small]
        counts = [len(e["exposed"]) for e in every]
        if len(set(counts)) != 1:  # a rank with another count of steps: no trace rather than a wrong one
            return None
        wait = chrome_trace.waits([e["exposed"] for e in every])
        own_s = [sum(st - w for st, w in zip(e["step"], wr)) / max(1, len(e["step"])) for e, wr in zip(every, wait)]
        estimated = chrome_trace.estimate_bytes([e["events"] for e in every])
        keep = set(chrome_trace.ranks_to_keep(own_s, estimated))
        mine = chrome_trace.rank_payload(self.steps) if ctx.rank in keep else None
        payloads = ctx.gather_object(mine) if ctx.world_size > 1 else [mine]
        if not ctx.is_main:
            return None
        clock = chrome_trace.clock_offsets([e["begin"] for e in every], [e["end"] for e in every],
                                     [e["host"] for e in every])
        trace = chrome_trace.build_trace(payloads, [e["host"] for e in every], clock, wait, own_s, estimated, info)
        trace["otherData"]["cost_s"] = {**self.cost_s, "gather": time.perf_counter() - began}
        return trace
