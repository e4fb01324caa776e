"""Verdicts that hold under noise, checked against causes of known size injected into real jobs.

- one rank of 4 (and of 8) stalled 30 ms in forward every step: ``bound=straggler``, that rank, forward,
  30 ms of excess
- a 30 ms stall on a rank drawn at random each step: no straggler, ``skew``; the last arrivals are the drawn
  ranks, and the waiting is what the slowest of N costs the others (30 ms · (N−1)/N on average)
- no injection, the same job repeated: no straggler named in any run
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from scaling.report import analyse
from scaling.train.faults import random_rank
from tests.jobs import TINY, check, load_run, only_run_dir, report, single, torchrun

STALL_ENV = "SCALING_INJECT_STALL"
STALL_S = 0.030
STEPS, WARMUP = 12, 2
# A tiny MLP: the 30 ms stall dwarfs its compute and all-reduce (about 2 ms a step at 4 processes here).
JOB = [*TINY["mlp"], f"train.steps={STEPS}", f"train.warmup_steps={WARMUP}", "train.log_every=6",
       "instrument.flops=false", "instrument.ops=false", "instrument.memory=false", "instrument.control_steps=0"]
# Measured on this 2-core machine (shared), three runs each: the straggler's excess read 30.2-30.7 ms at 4
# processes and 30.4-30.9 ms at 8; the skew job's mean waiting 21.9-22.6 ms against 22.5 ms injected.
# The tolerances below are several times those spreads.
EXCESS_TOL_S = 0.006
WAIT_TOL_S = 0.006
# One rank's own wait at 8 processes, three runs: 24.6-35.6 ms for a 30 ms stall (their means 28.4-31.6 ms).
RANK_WAIT_TOL_S = 0.015


def run_job(root: Path, nproc: int, stall: str | None, steps: int = STEPS) -> tuple[dict, list[dict], Path]:
    env = {STALL_ENV: stall} if stall else None
    check(torchrun(nproc, [*JOB, f"train.steps={steps}", f"paths.root={root}"], env=env))
    run_dir = only_run_dir(root / "adhoc")
    run, records = load_run(run_dir)
    return run, records, run_dir


@pytest.fixture(scope="module")
def straggler4(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("straggler4"), 4, f"forward:{STALL_S}@rank=2")


@pytest.fixture(scope="module")
def straggler8(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("straggler8"), 8, f"forward:{STALL_S}@rank=5", steps=8)


@pytest.fixture(scope="module")
def skew4(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("skew4"), 4, f"forward:{STALL_S}@rank=random")


@pytest.mark.parametrize("job, rank, world", [("straggler4", 2, 4), ("straggler8", 5, 8)])
def test_one_rank_stalled_in_forward_is_the_straggler(job, rank, world, request):
    run, records, _ = request.getfixturevalue(job)
    s = run["summary"]
    assert s["bound"] == "straggler", s["waiting"]["reason"]
    named = s["straggler"]
    assert (named["rank"], named["phase"]) == (rank, "forward"), named
    assert named["lost_s"] == pytest.approx(STALL_S, abs=EXCESS_TOL_S)
    # Last at (nearly) every step, far beyond chance, and its excess is what the others waited. With 8 processes
    # on 2 shared cores one step in 8 has seen another rank's scheduling delay exceed the 30 ms.
    assert named["last"] >= len(records) - 2
    assert named["p_value"] < s["waiting"]["level"]
    assert named["explained"] == pytest.approx(1.0, abs=0.2)
    # What the others waited: on average the stall; each rank alone also carries its own scheduling delays.
    waits = [r["wait_s"] for r in s["waiting"]["ranks"] if r["rank"] != rank]
    assert statistics.mean(waits) == pytest.approx(STALL_S, abs=EXCESS_TOL_S), waits
    assert all(w == pytest.approx(STALL_S, abs=RANK_WAIT_TOL_S) for w in waits), waits


def test_a_random_rank_stalled_each_step_is_skew_not_a_straggler(skew4):
    run, records, run_dir = skew4
    s, world = run["summary"], run["world_size"]
    assert s["straggler"] is None
    assert s["waiting"]["kind"] == "skew" and s["bound"] == "skew", s["waiting"]
    # The instrument sees who was late: the drawn rank is the last to arrive.
    drawn = [random_rank(r["step"], world) for r in records]
    seen = [r["slowest_rank"] for r in records]
    assert sum(a == b for a, b in zip(drawn, seen)) >= len(records) - 2, (drawn, seen)
    # Every step one rank is 30 ms late: the others wait for it, so the waiting per rank is 30 ms · (N−1)/N.
    assert s["comm_wait_s"] == pytest.approx(STALL_S * (world - 1) / world, abs=WAIT_TOL_S)
    assert statistics.median(r["comm_wait_s_max"] for r in records) == pytest.approx(STALL_S, abs=WAIT_TOL_S)
    assert s["waiting"]["own_spread_s"] == pytest.approx(STALL_S, abs=WAIT_TOL_S)
    # The report calls it skew and names no rank.
    found = " ".join(analyse([run_dir.parent]).findings[run_dir.parent.name])
    assert "Skew-bound at 4 processes" in found and "take turns" in found, found
    assert "wait for rank" not in found, found


def _two_ranks(step_s: float, lasts: list[int]) -> tuple[list[dict], dict[str, list[float]]]:
    """Records of a 2-rank job whose rank 0 loses 2.3 ms per step in backward and arrives last as ``lasts``
    say; rank 1 waits those 2.3 ms (a quarter of a 9 ms step and more)."""
    n = len(lasts)
    records = [{"step": i, "step_s": step_s, "slowest_rank": r} for i, r in enumerate(lasts)]
    totals = {"step_s": [n * step_s] * 2, "comm_wait_s": [0.0, n * 0.0023], "data_s": [0.0, 0.0],
              "forward_s": [n * 0.001] * 2, "backward_s": [n * 0.0043, n * 0.002], "optimizer_s": [0.0, 0.0],
              "other_s": [0.0, 0.0]}
    return records, totals


@pytest.mark.parametrize("step_s, steps, named", [(0.0059, 12, False), (0.0059, 200, True), (0.030, 12, True)])
def test_short_steps_are_pooled_into_stretches_before_the_last_arrivals_are_counted(step_s, steps, named):
    """Rank 0 last in all but one step in twelve: the clean-clone suite's false straggler at 5.9 ms steps is
    2 stretches of 25 ms, which chance explains; the same at 30 ms steps, or over 200 short steps, is not."""
    from scaling.records import waiting

    lasts = [0] * steps
    lasts[3] = 1
    records, totals = _two_ranks(step_s, lasts)
    decision = waiting.decide(records, totals, 0.25)
    winners = waiting.stretches(records)
    per_stretch = max(1, math.ceil(waiting.STRETCH_S / step_s))
    assert len(winners) == steps // per_stretch
    assert decision["stretches"] == len(winners) and decision["candidate"] == 0
    assert decision["kind"] == ("straggler" if named else "skew"), decision["reason"]
    assert f"arrived last in {steps - 1} of {steps} steps" in decision["reason"]
    if per_stretch > 1:
        assert f"most often in {decision['stretches_won']} of {len(winners)} stretches of at least 25 ms" \
            in decision["reason"]
    # The step-by-step count alone would have named rank 0 every time (11 of 12: p = 0.0063).
    assert waiting.last_arrival_p(steps - 1, steps, 2) < waiting.STRAGGLER_LEVEL


def test_a_stretch_tied_between_ranks_counts_for_no_one():
    from scaling.records import waiting

    records = [{"step_s": 0.005, "slowest_rank": r} for r in (0, 1, 0, 1, 0, 1, 1, 1)]
    # 24 ms close the first stretch after 5 steps (rank 0 last in 3 of 5); the last 3 steps, 15 ms, are too
    # short for a stretch of their own and join it: 8 steps, rank 1 last in 5.
    assert waiting.stretches(records, min_s=0.024) == [1]
    assert waiting.stretches(records[:5], min_s=0.024) == [0]
    assert waiting.stretches(records[:4], min_s=0.019) == [None]  # 2 and 2: a tie
    assert waiting.stretches(records[:4], min_s=0.02) == [None]


def test_the_straggler_report_names_the_rank_its_phase_and_the_test(straggler4):
    _, _, run_dir = straggler4
    found = " ".join(analyse([run_dir.parent]).findings[run_dir.parent.name])
    assert "Straggler-bound at 4 processes" in found and "wait for rank 2" in found and "in forward" in found, found
    assert f"arrived last in {STEPS} of {STEPS} steps" in found, found


# -- comparisons that know the noise ------------------------------------------------------------

SLOWDOWN_S = 0.060
"""Injected in forward on every rank of the slowed study: the compute part grows by this much per step. Large
against the noise: on this shared 2-core machine, with two jobs at a time, the runs' median steps read 6-19 ms
and single steps 3-75 ms; a 5 ms slowdown was (rightly) called within noise there, and at 30 ms the step's
interval once reached down to +0.6 % while compute's was +27..+35 ms."""
PAIR_JOB = [*JOB, "train.steps=12"]
REPEATS = 4
"""Runs of REF and of AGAIN."""


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """Three small "studies" of 2-process runs (repeats): a reference and the same run again, 4 runs each, and
    2 runs with a 60 ms sleep in every rank's forward. Two jobs at a time, REF beside AGAIN, so that the
    machine's load falls alike on both. Four runs a side, because the verdict needs a change beyond the runs'
    combined spread, which unchanged runs exceed about 1 time in 8 with 2 runs a side and 1 in 1,000 with 4
    (scaling.report.compare)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("compare")

    def launch(name: str) -> None:
        study = name.rstrip("0123456789")
        env = {STALL_ENV: f"forward:{SLOWDOWN_S}"} if study == "slow" else None
        check(torchrun(2, [*PAIR_JOB, f"paths.root={root}", f"study.name={study}"], env=env))

    with ThreadPoolExecutor(max_workers=2) as pool:
        for pair in (*((f"ref{i}", f"again{i}") for i in range(REPEATS)), ("slow0", "slow1")):
            list(pool.map(launch, pair))
    return {name: root / name for name in ("ref", "again", "slow")}


def test_no_straggler_is_named_without_injection(studies):
    """Eight 2-process runs with nothing injected: whatever the machine's jitter, no rank is blamed."""
    from scaling.report.study_folder import load_study

    runs = [r for name in ("ref", "again") for r in load_study(studies[name]).runs]
    assert len(runs) == 2 * REPEATS and all(r.completed for r in runs)
    for run in runs:
        assert run.summary["straggler"] is None, run.summary["waiting"]
        assert run.summary["bound"] != "straggler"


def test_a_study_against_itself_run_again_is_within_noise(studies):
    from scaling.report import compare

    result = compare.compare(studies["again"], studies["ref"])
    (point,) = result.points
    assert point.key == "2 processes" and point.note is None
    verdicts = {c.metric.key: c.verdict for c in point.changes}
    assert set(verdicts) >= {"step_s", "samples_per_s", "busbw_GBps"}
    assert set(verdicts.values()) == {"within noise"}, compare.text(result)
    assert point.runs == (REPEATS, REPEATS) and all(c.spread is not None for c in point.changes
                                                     if c.metric.key in ("step_s", "busbw_GBps"))


def test_a_slowdown_in_forward_is_a_regression_in_compute_with_exit_status_1(studies):
    from scaling.report import compare

    result = compare.compare(studies["slow"], studies["ref"], {"step_s": 0.05})
    (point,) = result.points
    changes = {c.metric.key: c for c in point.changes}
    assert changes["step_s"].verdict == "regressed", compare.text(result)
    # The part that moved is compute, by the injected 60 ms per step; no other part moved as much.
    parts = {p.part: p.delta_s for p in point.parts}
    assert parts["compute"].value == pytest.approx(SLOWDOWN_S, abs=0.4 * SLOWDOWN_S), compare.text(result)
    assert not parts["compute"].spans(0.0)
    assert max(parts, key=lambda k: parts[k].value) == "compute"
    assert "moved by 5% of the step or more, beyond the noise: compute" in compare.text(result)
    # The gate: exit 1 against the slowed study, 0 against the same study run again, 2 for a usage error.
    gate = ["--fail-on", "step_s:5%"]
    slow = report(studies["slow"], "--against", studies["ref"], *gate)
    again = report(studies["again"], "--against", studies["ref"], *gate)
    usage = report(studies["again"], "--against", studies["ref"], "--fail-on", "step_time:5%")
    assert slow.returncode == 1 and "FAIL step_s at 2 processes" in slow.stdout, slow.stdout + slow.stderr
    assert again.returncode == 0 and "PASS" in again.stdout, again.stdout + again.stderr
    assert usage.returncode == 2 and "step_time" in usage.stderr and len(usage.stderr.strip().splitlines()) == 1


def test_a_change_within_the_runs_spread_is_within_noise_however_narrow_its_bootstrap():
    """Hand-made: +10 % with a bootstrap interval of +8..+12 % is a regression only when it is beyond the runs'
    combined spread on a log scale: runs that ranged 9-12 ms and 10-12 ms (ln(12/9) + ln(12/10) = 0.47) leave
    it within noise; runs within 1 % of each other (0.02) do not."""
    from scaling.report.compare import METRICS, judge
    from scaling.report.intervals import Interval

    step, narrow = METRICS["step_s"], Interval(0.10, 0.08, 0.12)
    assert judge(narrow, step, 0.05) == "regressed"  # one run a side: no spread to go by
    assert judge(narrow, step, 0.05, spread=2 * math.log(1.01)) == "regressed"
    assert judge(narrow, step, 0.05, spread=math.log(12 / 9) + math.log(12 / 10)) == "within noise"
    assert judge(narrow, step, 0.05, spread=math.log1p(0.10)) == "within noise"  # exactly the spread: not beyond it
    assert judge(Interval(-0.10, -0.12, -0.08), step, 0.05, spread=0.02) == "improved"
    assert judge(narrow, step, 0.15, spread=0.02) == "within noise"  # below the threshold


def test_a_missing_point_is_one_line(studies, straggler4):
    from scaling.report import compare

    _, _, run_dir = straggler4
    out = compare.text(compare.compare(run_dir, studies["ref"]))
    assert "4 processes: only in NEW: REF has no completed run at 4 processes" in out
    assert "2 processes: only in REF: NEW has no completed run at 2 processes" in out


# -- is the host itself well? -------------------------------------------------------------------

HOG_LOOPS = 2
HOG_AUTOGROUP_NICE = -5
"""The hog: busy loops pinned to rank 1's core, in a session of their own. The kernel schedules each session
as one group (``sched_autogroup``), so the loops weigh together as one task of that group's nice, not one
each; a group at nice -5 weighs about 3 times a group at nice 0 (rank 1's session), which leaves rank 1 at
most about a quarter of its core. With the group at nice 0 (where it may not be lowered) rank 1 keeps about
half, and other users' processes on this shared machine squeeze both ranks as well: a single hog of the
job's own priority left rank 1 at 0.27 and 0.47 of its ceiling, rank 0 at 0.43 and 0.27."""


@pytest.fixture(scope="module")
def hogged(tmp_path_factory):
    """A 2-process job, each rank pinned to its own core (``dist.pin``), with the hog on core 1 for the whole job and a 30 ms stall in rank 1's forward (so that rank 1 is also the straggler). Its ceilings are
    given in the config: the same short probe, run by this test on core 1 just before the hogs start (the
    best of three), so that the comparison is with what that core delivers now."""
    import os
    import torch
    from scaling.instruments import hostprobe
    from tests.jobs import end_tree, start

    if not hasattr(os, "sched_setaffinity") or not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs cores 0 and 1 and sched_setaffinity")
    root = tmp_path_factory.mktemp("hogged")
    mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        os.sched_setaffinity(0, {1})
        torch.set_num_threads(1)
        probes = [hostprobe.probe(torch.device("cpu")) for _ in range(3)]
    finally:
        os.sched_setaffinity(0, mask)
        torch.set_num_threads(threads)
    ceiling_tflops = max(p["flops_per_s"] for p in probes) / 1e12
    ceiling_GBps = max(p["membw_Bps"] for p in probes) / 1e9
    loops = " ".join(["(while :; do :; done) &"] * HOG_LOOPS)
    hog = start(["taskset", "-c", "1", "sh", "-c", f"{loops} wait"])
    try:
        try:
            Path(f"/proc/{hog.pid}/autogroup").write_text(str(HOG_AUTOGROUP_NICE))
        except OSError:
            pass  # the session's group keeps nice 0
        check(torchrun(2, [*JOB, "train.steps=12", "dist.pin=true", f"hardware.peak_tflops={ceiling_tflops}",
                           f"hardware.peak_membw_GBps={ceiling_GBps}", f"paths.root={root}"],
                       env={STALL_ENV: f"forward:{STALL_S}@rank=1"}))
    finally:
        end_tree(hog)
    run_dir = only_run_dir(root / "adhoc")
    run, _ = load_run(run_dir)
    return run, run_dir


def test_a_rank_whose_core_is_hogged_is_named_a_slow_node(hogged):
    from scaling.instruments import hostprobe

    run, run_dir = hogged
    probe = run["host_probe"]
    ranks = probe["ranks"]
    # dist.pin put each rank on its own core: the hogs share rank 1's core only.
    assert [r["cores"] for r in ranks] == [[0], [1]], ranks
    assert probe["ceiling_flops_source"] == probe["ceiling_membw_source"] == "config"
    assert 1 in probe["slow_ranks"] and ranks[1]["slow"], ranks[1]
    assert probe["ceiling_below_delivered"] is False  # the ceiling is what these cores delivered just before
    for when in ("before", "after"):
        figures = ranks[1][when]
        # Below 0.7 of what the core delivered just before the hog started, at both probes. (On this loaded
        # machine rank 0 is named too, rightly: other users' processes took its core as well. Rank 1 read
        # 0.74-0.95 of rank 0 in three runs, so the peer rule is not asserted here.)
        assert figures["gflops_of_ceiling"] < hostprobe.SLOW_RATIO, figures
        assert 0 < figures["seconds"] < 1.0, figures
    assert any("GEMM at a share of the ceiling" in reason for reason in ranks[1]["reasons"]), ranks[1]
    # The straggler (the stall in rank 1's forward) is on the slow host, and the findings say both.
    assert run["summary"]["straggler"]["rank"] == 1 and run["summary"]["straggler"]["slow_host"] is True
    found = " ".join(analyse([run_dir.parent]).findings[run_dir.parent.name])
    assert "Slow node: throttling or a noisy neighbour" in found and "rank 1 of 2 processes" in found, found
    assert "its host was the slow one" in found, found


def test_a_ceiling_below_what_the_host_delivers_is_named(tmp_path):
    """``hardware.peak_tflops=0.001``: a GEMM ceiling of 1 GFLOP/s, which a 512x512 product on one core of this
    machine exceeds 50 to 150 times. The run records that the ceiling is below what it delivered, and the
    findings say that MFU reads high and how to mend it (the fault a cached probe taken on a busy host makes)."""
    check(single([*JOB, "train.steps=4", "hardware.peak_tflops=0.001", f"paths.root={tmp_path}"]))
    run_dir = only_run_dir(tmp_path / "adhoc")
    probe = load_run(run_dir)[0]["host_probe"]
    assert probe["ceiling_gflops"] == pytest.approx(1.0) and probe["ceiling_flops_source"] == "config"
    assert probe["ceiling_below_delivered"] is True, probe
    found = " ".join(analyse([run_dir.parent]).findings[run_dir.parent.name])
    assert "Peak FLOP/s too low: the ceiling of 1.0 GFLOP/s (config)" in found, found
    assert "correct hardware.peak_tflops" in found, found


def test_a_ceiling_is_too_low_only_when_every_rank_beats_it_at_both_probes():
    from scaling.instruments import hostprobe

    def table(*gflops_pairs):  # [before flops/s, before B/s, before s, after flops/s, after B/s, after s] per rank
        return [[b * 1e9, 1e10, 0.1, a * 1e9, 1e10, 0.1] for b, a in gflops_pairs]

    def low(*pairs):
        return hostprobe.record(table(*pairs), ["h"] * len(pairs), [None] * len(pairs), 10e9, 1e10, "probe",
                                "probe")["ceiling_below_delivered"]

    assert low((16, 17), (18, 15.5))
    assert not low((16, 17), (18, 14))  # one probe of one rank at 1.4x: the ceiling may be right
    assert not low((9, 10), (10, 11))
    assert not hostprobe.record(table((50, 50)), ["h"], [None], None, None, None, None)["ceiling_below_delivered"]
