"""``<run>/timeline.json``: a few measured steps of every rank as a Chrome trace (Trace Event Format).

Perfetto (ui.perfetto.dev) and chrome://tracing open it. The JSON Object Format: ``traceEvents`` (a list of
events), ``displayTimeUnit`` and ``otherData`` (metadata of the trace, shown by the viewers). Events:

- ``ph: "X"`` complete events, ``ts`` (start) and ``dur`` in microseconds of the aligned clock, ``pid`` (the
  rank + 1), ``tid`` (the track), ``name``, ``cat`` and ``args``;
- ``ph: "M"`` metadata events: ``process_name`` ("rank R (host)"), ``process_sort_index`` (the rank),
  ``thread_name`` and ``thread_sort_index`` per track.

Tracks of each rank (``TRACKS``): ``step`` (one slice per step), ``phases`` (data, forward, backward, optimizer,
other, back to back: they add up to ``step_s`` as steps.jsonl has them), ``exposed communication`` (the tail from
the last bucket ready to the last all-reduce completion, the buffer broadcast before forward, and the other
collectives' parts on the critical path: the calling thread held in the call, or the compute stream's waits),
``waiting for slower ranks`` (the step's ``comm_wait_s``, from the start of its longest exposed slice), ``all-reduce buckets`` (each
bucket from its launch to its completion, on as many lanes as buckets are in flight at once) and
``collectives`` (ZeRO-1's broadcast, FSDP's all-gathers and reduce-scatters, issue to completion).

Only measured steps are in it (the first ``instrument.timeline_steps``): warm-up, control and profiled steps
are not. Beyond ``MAX_BYTES`` (estimated before anything is gathered) only the fastest, median and slowest
ranks (by their own time, ``step_s − comm_wait_s``) are kept; ``otherData`` says so.

This module is torch-free: the training job hands it plain numbers (``RankTimeline``), the report reads the file.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TIMELINE_JSON = "timeline.json"
FORMAT = "scaling-timeline/1"
PHASES = ("data", "forward", "backward", "optimizer", "other")

TRACK_STEP, TRACK_PHASES, TRACK_EXPOSED, TRACK_WAITING = 1, 2, 3, 4
TRACK_BUCKETS = 10
"""First lane of the bucket track; lane k is ``TRACK_BUCKETS + k``."""
TRACK_COLLECTIVES = 30
TRACKS = {TRACK_STEP: "step", TRACK_PHASES: "phases", TRACK_EXPOSED: "exposed communication",
          TRACK_WAITING: "waiting for slower ranks"}

BYTES_PER_EVENT = 220
"""Estimated size of one complete event in the file (its JSON with args; 211 B on average in a 2-process MLP trace)."""
BYTES_PER_RANK = 1600
"""The metadata events and otherData entry of one rank."""
MAX_BYTES = 16_000_000
"""Above this estimate only the fastest, median and slowest ranks are written."""

ALIGNMENT = ("aligned time = the rank's host clock (time.perf_counter, CLOCK_MONOTONIC; on CUDA the events "
             "anchored to it after a synchronize) - offset_s - rank 0's exit from the last of the barriers before "
             "the measured steps. Ranks on one host share that clock (offset_s 0 on rank 0's host); every other "
             "host's offset_s is the median over the barriers of the difference between the moments its lowest "
             "rank and rank 0 left the same barrier (all ranks leave a barrier together, within its release "
             "skew). barrier_offset_s: that difference for each rank itself (on rank 0's host, where the true "
             "offset is 0, it is the barrier method's error). end_residual_s: the same difference at the barriers "
             "after the measured steps, less offset_s: drift and error over the run.")


# -- what each rank hands over -------------------------------------------------------------------


def rank_payload(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """What one rank sends at the end: its timeline steps as recorded (``scaling.instruments.timeline``)."""
    return {"steps": steps}


def events_of(step: dict[str, Any]) -> int:
    """Complete events one recorded step becomes."""
    return (1 + len(PHASES) + 2 + len(step.get("buckets", ())) + len(step.get("syncs", ()))
            + len(step.get("collectives", ())) + len(step.get("collectives_exposed", ())))


def estimate_bytes(event_counts: Sequence[int]) -> int:
    """The file's size from every rank's event count, before anything is gathered."""
    return sum(BYTES_PER_EVENT * n + BYTES_PER_RANK for n in event_counts)


def waits(exposed: Sequence[Sequence[float]]) -> list[list[float]]:
    """``[rank][step]`` comm_wait_s from ``[rank][step]`` comm_exposed_s: exposed less the step's smallest
    (as ``scaling.records.aggregate`` defines it)."""
    if not exposed or not exposed[0]:
        return [[] for _ in exposed]
    least = [min(row[s] for row in exposed) for s in range(len(exposed[0]))]
    return [[row[s] - least[s] for s in range(len(row))] for row in exposed]


def ranks_to_keep(own_s: Sequence[float], estimated: int, max_bytes: int = MAX_BYTES) -> list[int]:
    """Every rank while the estimate fits; else the fastest, median and slowest by own time (sorted, unique)."""
    ranks = list(range(len(own_s)))
    if estimated <= max_bytes or len(ranks) <= 3:
        return ranks
    order = sorted(ranks, key=lambda r: (own_s[r], r))
    return sorted({order[0], order[len(order) // 2], order[-1]})


def clock_offsets(begin: Sequence[Sequence[float]], end: Sequence[Sequence[float]] | None,
                  hosts: Sequence[str]) -> dict[str, Any]:
    """Per rank the offset of its clock to rank 0's and the residual after the measured steps, from the
    barrier exit times ``[rank][round]`` (each rank's own clock).

    Ranks on one host read one clock (CLOCK_MONOTONIC is the kernel's, shared by its processes), so only hosts
    are aligned: every rank of a host gets the offset the barriers measured for the host's lowest rank (0 on
    rank 0's host). ``barrier_offsets_s`` is what the barriers alone say for each rank: on one host, where the
    true offset is 0, it is the barrier method's error.
    """
    def difference(rows: Sequence[Sequence[float]], rank: int) -> float:
        return statistics.median(b - b0 for b, b0 in zip(rows[rank], rows[0]))

    measured = [difference(begin, r) for r in range(len(begin))]
    leader = {}
    for rank, host in enumerate(hosts):
        leader.setdefault(host, rank)
    offsets = [0.0 if hosts[r] == hosts[0] else measured[leader[hosts[r]]] for r in range(len(begin))]
    residual: list[float | None] = [None] * len(begin)
    if end and all(end):
        residual = [difference(end, r) - offsets[r] for r in range(len(end))]
    return {"offsets_s": offsets, "barrier_offsets_s": measured, "end_residual_s": residual, "zero": begin[0][-1],
            "begin": [list(row) for row in begin], "end": [list(row) for row in end] if end else None}


# -- the trace -----------------------------------------------------------------------------------


def _lanes(intervals: list[tuple[float, float]]) -> list[int]:
    """Greedy lane per interval (in the given order) so that no two on a lane overlap: complete events on one
    track must nest, and buckets in flight at once do not."""
    ends: list[float] = []
    out = []
    for start, end in intervals:
        for lane, last in enumerate(ends):
            if start >= last:
                ends[lane] = end
                out.append(lane)
                break
        else:
            ends.append(end)
            out.append(len(ends) - 1)
    return out


def _x(name: str, cat: str, start_us: float, end_us: float, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "cat": cat, "ph": "X", "ts": round(start_us, 3), "dur": round(max(0.0, end_us - start_us), 3),
            "pid": pid, "tid": tid, "args": args}


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def build_trace(payloads: Sequence[dict[str, Any] | None], hosts: Sequence[str], clock: dict[str, Any],
                wait_s: Sequence[Sequence[float]], own_s: Sequence[float], estimated: int,
                info: dict[str, Any]) -> dict[str, Any]:
    """The trace of the kept ranks (``payloads[r]`` None for a rank left out); ``info`` goes into ``otherData``."""
    events: list[dict[str, Any]] = []
    offsets, zero = clock["offsets_s"], clock["zero"]
    kept = [r for r, p in enumerate(payloads) if p is not None]
    for rank in kept:
        pid = rank + 1
        us = lambda t, r=rank: (t - offsets[r] - zero) * 1e6  # noqa: E731
        tracks = dict(TRACKS)
        for s, step in enumerate(payloads[rank]["steps"]):
            marks = step["phases"]
            events.append(_x(f"step {step['step']}", "step", us(marks[0]), us(marks[-1]), pid, TRACK_STEP,
                             {"step": step["step"], **{k: v for k, v in step["values"].items()}}))
            for phase, a, b in zip(PHASES, marks, marks[1:]):
                events.append(_x(phase, "phase", us(a), us(b), pid, TRACK_PHASES,
                                 {"step": step["step"], "seconds": b - a}))
            exposed: list[tuple[float, float]] = []  # this step's exposed slices, where the waiting is drawn
            for a, b in step.get("syncs", ()):
                exposed.append((a, b))
                events.append(_x("broadcast buffers", "exposed", us(a), us(b), pid, TRACK_EXPOSED,
                                 {"step": step["step"], "seconds": b - a}))
            buckets = step.get("buckets", ())
            for (index, launch, returned, done, nbytes), lane in zip(buckets, _lanes([(b[1], b[3]) for b in buckets])):
                tid = TRACK_BUCKETS + lane
                tracks[tid] = "all-reduce buckets" if lane == 0 else f"all-reduce buckets (lane {lane + 1})"
                events.append(_x(f"bucket {index}", "bucket", us(launch), us(done), pid, tid,
                                 {"step": step["step"], "bucket": index, "bytes": nbytes,
                                  "held_s": returned - launch, "seconds": done - launch}))
            if buckets:
                last_ready, last_done = max(b[1] for b in buckets), max(b[3] for b in buckets)
                exposed.append((last_ready, last_done))
                events.append(_x("exposed all-reduce", "exposed", us(last_ready), us(last_done), pid, TRACK_EXPOSED,
                                 {"step": step["step"], "seconds": last_done - last_ready}))
            collectives = step.get("collectives", ())
            for (kind, start, returned, done, nbytes), lane in zip(collectives,
                                                                   _lanes([(c[1], c[3]) for c in collectives])):
                tid = TRACK_COLLECTIVES + lane
                tracks[tid] = "collectives" if lane == 0 else f"collectives (lane {lane + 1})"
                events.append(_x(kind, "collective", us(start), us(done), pid, tid,
                                 {"step": step["step"], "bytes": nbytes, "held_s": returned - start,
                                  "seconds": done - start}))
            for kind, a, b in step.get("collectives_exposed", ()):
                if b > a:
                    exposed.append((a, b))
                    events.append(_x(f"exposed {kind}", "exposed", us(a), us(b), pid, TRACK_EXPOSED,
                                     {"step": step["step"], "seconds": b - a}))
            # The waiting is in the collective the rank entered first and left with the others: drawn from the start
            # of its longest exposed slice (DDP: the all-reduce tail; ZeRO-1 or FSDP: the collective after a stall).
            wait = wait_s[rank][s] if s < len(wait_s[rank]) else 0.0
            if wait > 0 and exposed:
                a, b = max(exposed, key=lambda ab: ab[1] - ab[0])
                events.append(_x("waiting for slower ranks", "waiting", us(a), us(a + min(wait, b - a)), pid,
                                 TRACK_WAITING, {"step": step["step"], "seconds": min(wait, b - a),
                                                 "comm_wait_s": wait}))
        events.append(_meta("process_name", pid, 0, {"name": f"rank {rank} ({hosts[rank]})"}))
        events.append(_meta("process_sort_index", pid, 0, {"sort_index": rank}))
        for tid, name in sorted(tracks.items()):
            events.append(_meta("thread_name", pid, tid, {"name": name}))
            events.append(_meta("thread_sort_index", pid, tid, {"sort_index": tid}))
    world = len(payloads)
    left_out = world - len(kept)
    other = {
        "format": FORMAT,
        **info,
        "world_size": world,
        "steps": [step["step"] for step in payloads[kept[0]]["steps"]] if kept else [],
        "ranks_kept": kept,
        "ranks_left_out": left_out,
        "selection": (f"all {world} ranks" if not left_out else
                      f"only the fastest, median and slowest of {world} ranks by own time (step_s - comm_wait_s): "
                      f"the estimated {estimated} bytes exceed {MAX_BYTES}"),
        "estimated_bytes": estimated,
        "max_bytes": MAX_BYTES,
        "excluded": "warm-up, no-communication control and profiled steps are not in this trace",
        "time_unit": "ts and dur in microseconds of the aligned clock",
        "pid": "rank + 1",
        "alignment": {
            "method": ALIGNMENT,
            "ranks": [{"rank": r, "host": hosts[r], "offset_s": offsets[r],
                       "barrier_offset_s": clock["barrier_offsets_s"][r], "end_residual_s": clock["end_residual_s"][r],
                       "own_s": own_s[r], "barrier_exits_s": clock["begin"][r],
                       "end_barrier_exits_s": clock["end"][r] if clock.get("end") else None} for r in range(world)],
        },
    }
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def write(path: Path, trace: dict[str, Any]) -> None:
    from scaling.records.files import atomic_write_text

    atomic_write_text(path, json.dumps(trace, separators=(",", ":")) + "\n")


# -- reading it back (the report) ----------------------------------------------------------------


def read(path: Path) -> dict[str, Any] | None:
    """timeline.json, or None where it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("traceEvents"), list) else None


def slices_by_rank(trace: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Complete events per rank (pid − 1), in file order."""
    out: dict[int, list[dict[str, Any]]] = {}
    for event in trace["traceEvents"]:
        if event.get("ph") == "X":
            out.setdefault(int(event["pid"]) - 1, []).append(event)
    return out
