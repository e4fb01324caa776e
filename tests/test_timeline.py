"""timeline.json, the Chrome trace of the first measured steps, checked against the run's own records and an
injected stall of known size.

- the file parses and carries the Trace Event Format's fields (complete events with ts/dur in microseconds,
  pid/tid, process and thread names and sort indices) and no misnested slice on any track
- per rank and step the phase slices are the phase times of the rank's own step records (within 1 %)
- a 50 ms stall in rank 1's data loading is a ~50 ms data slice on rank 1 and ~50 ms of waiting on rank 0 at
  the same aligned time; rank 0 stops waiting when rank 1 launches its last bucket
- ``instrument.profile_trace``: torch.profiler's trace of the profiled steps per rank, with its
  ``distributedInfo`` (rank, world size, backend: what Holistic Trace Analysis reads)
- one process: a trace of its steps without communication tracks; ``instrument.timeline_steps=0``: no file
- the size bound keeps the fastest, median and slowest ranks and says so; the figure draws 2 and 64 ranks

No consumer of the format runs here: the ``perfetto`` package installs from PyPI, but its trace processor is a
binary it downloads on first use, which this machine cannot reach; the file is checked against the format's
documented fields instead.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from scaling.records import chrome_trace
from scaling.report import timeline_plot
from tests.jobs import PNG_SIGNATURE, TINY, check, only_run_dir, png_size, read_run, single, torchrun

STALL_S = 0.050
STEPS, WARMUP, TIMELINE = 6, 2, 4
# Two warm-up steps: DDP rebuilds its buckets after the first and broadcasts their order in the second's forward
# (a collective that would make rank 0 wait in forward, not in the all-reduce); the timeline starts after it.
JOB = [*TINY["mlp"], f"train.steps={STEPS}", f"train.warmup_steps={WARMUP}", "train.log_every=3",
       "instrument.flops=false", "instrument.ops=false", "instrument.memory=false", "instrument.control_steps=0",
       f"instrument.timeline_steps={TIMELINE}"]
# The stalled job also keeps torch.profiler's trace of one profiled step per rank (after the measured steps).
PROFILED = ["instrument.ops=true", "instrument.ops_steps=1", "instrument.profile_trace=true"]
# Measured on this 2-core machine, seven runs of the stalled job (three with the machine's load average near 7,
# four near 12-22 from other jobs), 4 timeline steps each: rank 1's data slice 50.3-53.0 ms; rank 0's waiting
# 45.3-55.7 ms (the medians per run 50.2-52.3 ms); the two slices' midpoints 0.1-5.1 ms apart (medians 0.8-3.0 ms:
# rank 0's waiting starts after its own forward and backward); the end of rank 0's waiting 0.0-7.1 ms from rank 1's
# last bucket launch (medians 0.1-4.8 ms: the two ranks' completion callbacks are scheduled apart on two busy
# cores); the barriers' offset for rank 1, on this one host where the true offset is 0, -0.52 to +2.07 ms. Each
# tolerance is at least twice the largest deviation seen.
DATA_TOL_S, DATA_MEDIAN_TOL_S = 0.006, 0.002
WAIT_TOL_S, WAIT_MEDIAN_TOL_S = 0.012, 0.005
MIDPOINT_TOL_S, MIDPOINT_MEDIAN_TOL_S = 0.011, 0.007
LAUNCH_TOL_S, LAUNCH_MEDIAN_TOL_S = 0.015, 0.010
ALIGN_TOL_S = 0.005
PHASE_REL_TOL = 0.01


def x_events(trace: dict, rank: int, cat: str | None = None, name: str | None = None) -> list[dict]:
    return [e for e in chrome_trace.slices_by_rank(trace)[rank] if (cat is None or e["cat"] == cat)
            and (name is None or e["name"] == name)]


def per_step(events: list[dict]) -> dict[int, dict]:
    return {e["args"]["step"]: e for e in events}


def stall_figures(trace: dict) -> dict[str, list[float]]:
    """Per timeline step (seconds): rank 1's data slice, rank 0's waiting, how far apart their midpoints are, and
    how far the end of rank 0's waiting is from rank 1's last bucket launch (the start of its exposed tail)."""
    data1 = per_step(x_events(trace, 1, "phase", "data"))
    wait0 = per_step(x_events(trace, 0, "waiting"))
    tail1 = per_step(x_events(trace, 1, "exposed", "exposed all-reduce"))
    out: dict[str, list[float]] = {"data1": [], "wait0": [], "midpoints": [], "wait_end_to_launch": []}
    for step, d in sorted(data1.items()):
        w = wait0[step]
        out["data1"].append(d["dur"] / 1e6)
        out["wait0"].append(w["dur"] / 1e6)
        out["midpoints"].append(abs((d["ts"] + d["dur"] / 2) - (w["ts"] + w["dur"] / 2)) / 1e6)
        out["wait_end_to_launch"].append(abs(w["ts"] + w["dur"] - tail1[step]["ts"]) / 1e6)
    return out


def run_stalled(root: Path) -> Path:
    check(torchrun(2, [*JOB, *PROFILED, f"paths.root={root}"],
                   env={"SCALING_INJECT_STALL": f"data:{STALL_S}@rank=1"}))
    return only_run_dir(root / "adhoc")


@pytest.fixture(scope="module")
def stalled(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = run_stalled(tmp_path_factory.mktemp("timeline"))
    return run_dir, json.loads((run_dir / chrome_trace.TIMELINE_JSON).read_text())


def test_the_trace_carries_the_documented_fields(stalled):
    run_dir, trace = stalled
    assert set(trace) == {"traceEvents", "displayTimeUnit", "otherData"} and trace["displayTimeUnit"] == "ms"
    other = trace["otherData"]
    assert other["format"] == chrome_trace.FORMAT and other["world_size"] == 2 and other["run_id"] == run_dir.name
    assert other["steps"] == list(range(WARMUP, WARMUP + TIMELINE)) and other["ranks_kept"] == [0, 1]
    assert other["ranks_left_out"] == 0 and "control" in other["excluded"]
    events = trace["traceEvents"]
    for e in events:
        assert e["ph"] in ("X", "M"), e
        if e["ph"] == "X":
            assert set(e) == {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"}, e
            assert isinstance(e["ts"], (int, float)) and e["dur"] >= 0 and e["pid"] in (1, 2), e
    meta = {(e["name"], e["pid"], e["tid"]): e["args"] for e in events if e["ph"] == "M"}
    run = read_run(run_dir)
    for rank in (0, 1):
        host = run["provenance"]["rank_hosts"][rank] if "rank_hosts" in run["provenance"] else None
        name = meta[("process_name", rank + 1, 0)]["name"]
        assert name.startswith(f"rank {rank} (") and (host is None or host in name), name
        assert meta[("process_sort_index", rank + 1, 0)] == {"sort_index": rank}
        tids = {e["tid"] for e in events if e["ph"] == "X" and e["pid"] == rank + 1}
        named = {tid for (kind, pid, tid) in meta if kind == "thread_name" and pid == rank + 1}
        assert tids <= named and {chrome_trace.TRACK_STEP, chrome_trace.TRACK_PHASES, chrome_trace.TRACK_EXPOSED,
                                  chrome_trace.TRACK_BUCKETS} <= tids
        assert meta[("thread_name", rank + 1, chrome_trace.TRACK_PHASES)] == {"name": "phases"}
    # Complete events on one track must nest (Perfetto and chrome://tracing draw a track as a stack).
    tracks: dict[tuple[int, int], list[dict]] = {}
    for e in events:
        if e["ph"] == "X":
            tracks.setdefault((e["pid"], e["tid"]), []).append(e)
    for key, slices in tracks.items():
        slices.sort(key=lambda e: (e["ts"], -e["dur"]))
        for a, b in zip(slices, slices[1:]):
            assert b["ts"] >= a["ts"] + a["dur"] - 1e-3 or b["ts"] + b["dur"] <= a["ts"] + a["dur"] + 1e-3, (key, a, b)
    # The alignment is recorded: an offset per rank, 0 for the ranks on rank 0's host.
    ranks = other["alignment"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["offset_s"] == 0.0
    assert all(len(r["barrier_exits_s"]) == 5 and abs(r["barrier_offset_s"]) < ALIGN_TOL_S for r in ranks), ranks


def test_phase_slices_are_the_recorded_phase_times(stalled):
    run_dir, trace = stalled
    for rank in (0, 1):
        recorded = {}
        for line in (run_dir / "logs" / f"rank{rank}.steps.jsonl").read_text().splitlines():
            row = json.loads(line)
            recorded[row["step"]] = row
        phases = x_events(trace, rank, "phase")
        steps = per_step(x_events(trace, rank, "step"))
        assert len(phases) == TIMELINE * len(chrome_trace.PHASES)
        for step, slice_ in steps.items():
            mine = [e for e in phases if e["args"]["step"] == step]
            assert [e["name"] for e in mine] == list(chrome_trace.PHASES)
            for e in mine:
                want = recorded[step][f"{e['name']}_s"]
                assert e["dur"] / 1e6 == pytest.approx(want, rel=PHASE_REL_TOL, abs=2e-6), (rank, step, e, want)
            assert sum(e["dur"] for e in mine) / 1e6 == pytest.approx(recorded[step]["step_s"], rel=PHASE_REL_TOL)
            assert slice_["dur"] / 1e6 == pytest.approx(recorded[step]["step_s"], rel=PHASE_REL_TOL)
            # back to back: each phase starts where the one before it ended, the first at the step's start
            assert mine[0]["ts"] == pytest.approx(slice_["ts"], abs=1e-2)
            for a, b in zip(mine, mine[1:]):
                assert b["ts"] == pytest.approx(a["ts"] + a["dur"], abs=1e-2)


def test_a_stall_in_rank_1s_data_is_rank_0s_waiting_at_the_same_time(stalled):
    _, trace = stalled
    figures = stall_figures(trace)
    assert len(figures["data1"]) == TIMELINE
    for key, tol, median_tol in (("data1", DATA_TOL_S, DATA_MEDIAN_TOL_S), ("wait0", WAIT_TOL_S, WAIT_MEDIAN_TOL_S)):
        assert all(v == pytest.approx(STALL_S, abs=tol) for v in figures[key]), (key, figures)
        assert statistics.median(figures[key]) == pytest.approx(STALL_S, abs=median_tol), (key, figures)
    for key, tol, median_tol in (("midpoints", MIDPOINT_TOL_S, MIDPOINT_MEDIAN_TOL_S),
                                 ("wait_end_to_launch", LAUNCH_TOL_S, LAUNCH_MEDIAN_TOL_S)):
        assert max(figures[key]) <= tol and statistics.median(figures[key]) <= median_tol, (key, figures)
    # rank 1, the late one, waits for no one
    assert not x_events(trace, 1, "waiting") or max(e["dur"] for e in x_events(trace, 1, "waiting")) < 0.005e6


def test_the_profiled_steps_keep_torch_profilers_trace_per_rank_with_distributed_metadata(stalled):
    run_dir, _ = stalled
    for rank in (0, 1):
        trace = json.loads((run_dir / "profile" / f"rank{rank}.json").read_text())
        info = trace["distributedInfo"]  # what Holistic Trace Analysis reads a rank's identity from
        assert (info["rank"], info["world_size"], info["backend"]) == (rank, 2, "gloo"), info
        names = {e.get("name") for e in trace["traceEvents"]}
        assert any(str(n).startswith("scaling::") for n in names), sorted(map(str, names))[:20]


def test_one_process_has_its_steps_and_no_communication_and_zero_steps_no_file(tmp_path):
    base = [*JOB, "instrument.timeline_steps=2"]
    check(single([*base, f"paths.root={tmp_path / 'one'}"]))
    run_dir = only_run_dir(tmp_path / "one" / "adhoc")
    trace = json.loads((run_dir / chrome_trace.TIMELINE_JSON).read_text())
    assert trace["otherData"]["steps"] == [WARMUP, WARMUP + 1] and trace["otherData"]["world_size"] == 1
    assert {e["cat"] for e in chrome_trace.slices_by_rank(trace)[0]} == {"step", "phase"}
    check(single([*JOB, "instrument.timeline_steps=0", f"paths.root={tmp_path / 'off'}"]))
    assert not (only_run_dir(tmp_path / "off" / "adhoc") / chrome_trace.TIMELINE_JSON).exists()


# -- the size bound and the figure (in-process, from the stalled job's records) ---------------------


def test_beyond_the_size_bound_the_fastest_median_and_slowest_ranks_are_kept():
    own = [0.010 + 0.001 * ((r * 7) % 10) for r in range(10)]
    assert chrome_trace.ranks_to_keep(own, estimated=100) == list(range(10))
    kept = chrome_trace.ranks_to_keep(own, estimated=chrome_trace.MAX_BYTES + 1)
    order = sorted(range(10), key=lambda r: own[r])
    assert kept == sorted({order[0], order[5], order[-1]})
    steps = [{"step": 3, "phases": [0.0, 0.001, 0.002, 0.003, 0.004, 0.005], "values": {"step_s": 0.005}}]
    payloads = [{"steps": steps} if r in kept else None for r in range(10)]
    clock = chrome_trace.clock_offsets([[0.0] * 5] * 10, [[1.0] * 5] * 10, ["h"] * 10)
    trace = chrome_trace.build_trace(payloads, ["h"] * 10, clock, [[0.0]] * 10, own, chrome_trace.MAX_BYTES + 1, {})
    assert trace["otherData"]["ranks_kept"] == kept and trace["otherData"]["ranks_left_out"] == 7
    assert "fastest, median and slowest of 10" in trace["otherData"]["selection"]
    assert sorted(chrome_trace.slices_by_rank(trace)) == kept


def test_offsets_align_hosts_and_leave_one_hosts_ranks_on_its_clock():
    # rank 2 and 3 on a host whose clock reads 100 s more; the barrier exits differ by a little release skew
    begin = [[0.0, 1.0, 2.0], [0.0002, 1.0001, 2.0003], [100.0001, 101.0002, 102.0], [100.0003, 101.0, 102.0004]]
    clock = chrome_trace.clock_offsets(begin, None, ["a", "a", "b", "b"])
    assert clock["offsets_s"][:2] == [0.0, 0.0]
    assert clock["offsets_s"][2] == clock["offsets_s"][3] == pytest.approx(100.0001, abs=1e-9)
    assert clock["barrier_offsets_s"][1] == pytest.approx(0.0002, abs=1e-9)


def test_the_figure_draws_two_ranks_and_summarises_sixty_four(stalled, tmp_path):
    _, trace = stalled
    two = timeline_plot.draw([("stalled", trace, "2 ranks")], tmp_path / "two.png")
    by = chrome_trace.slices_by_rank(trace)
    rng = random.Random(0)
    events = [dict(e, pid=r + 1, ts=e["ts"] + rng.uniform(-300, 300)) for r in range(64)
              for e in by[1 if r == 37 else 0]]
    own = [{"rank": r, "own_s": 0.057 if r == 37 else 0.011 + rng.uniform(0, 0.002)} for r in range(64)]
    many = {"traceEvents": events, "otherData": {**trace["otherData"], "world_size": 64, "ranks_kept": list(range(64)),
                                                 "alignment": {"ranks": own}}}
    rows, summarised = timeline_plot.shown_ranks(many, list(range(64)))
    assert summarised and rows[0] == (37, "rank 37\n(slowest)") and len(rows) == 3
    sixty_four = timeline_plot.draw([("synthetic", many, "64 ranks")], tmp_path / "many.png")
    for path in (two, sixty_four):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        width, height = png_size(path)
        assert width >= 1000 and height >= 250, (path, width, height)
