"""``python -m scaling.study``: real studies of a tiny MLP, each point a real torchrun job.

The studies are made once (tests/shared_runs.py) and shared with test_report.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from scaling.study import run as study
from tests.jobs import STUDY_TINY as TINY, end_tree, explain, read_run, start, study as run_study, tree, wait_for
from tests.shared_runs import FAILING_HOOK, STRONG


# -- input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, names", [
    (["study=adhoc"], "study.kind"),
    (["study=strong", "study.kind=diagonal"], "study.kind"),
    (["study=strong", "study.nprocs=[]"], "study.nprocs"),
    (["study=weak", "study.nprocs=[0,2]"], "study.nprocs"),
    (["study=weak", "study.nprocs=[1,-2]"], "study.nprocs"),
    (["study=strong", "study.repeats=0"], "study.repeats"),
    (["study=strong", "study.nprocs=[1,2,4]", "train.global_batch_size=6"], "train.global_batch_size=6"),
    (["study=weak", "train.global_batch_size=8"], "train.global_batch_size"),
    (["study=strong", "paths.run_id=mine"], "paths.run_id"),
    (["study=strong", "dist.bucket_cap_mb=0"], "dist.bucket_cap_mb"),
    (["study=strong", "study.controls=sometimes"], "study.controls"),
])
def test_bad_study_input_is_refused_with_one_line_before_anything_runs(tmp_path, capsys, args, names):
    root = tmp_path / "runs"
    code = study.entry([*TINY, f"paths.root={root}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("scaling.study: error:") and names in err
    assert not root.exists(), "nothing may be created before the input is checked"


def test_indivisible_global_batch_names_the_world_size_and_a_valid_choice(tmp_path, capsys):
    code = study.entry([*TINY, f"paths.root={tmp_path}", "study=strong", "study.nprocs=[1,2,4]",
                        "train.global_batch_size=6"])
    err = capsys.readouterr().err
    assert code == 2
    assert "world size 4" in err and "multiple of 4" in err


# -- a strong and a weak study ----------------------------------------------------------------


def test_strong_study_runs_every_point_as_a_torchrun_job(strong):
    runs = {p.name: read_run(p) for p in strong.dir.iterdir() if (p / "run.json").exists() and p.name[0] == "n"}
    assert sorted(runs) == ["n1-r0", "n1-r1", "n2-r0", "n2-r1"]
    for run_id, run in runs.items():
        assert run["status"] == "completed", run_id
        assert run["launcher"] == "torchrun"
        assert run["world_size"] == int(run_id[1])
        assert run["study"] == "tiny-strong" and run["study_kind"] == "strong"


def test_a_solo_control_runs_exactly_for_the_batches_no_one_process_point_covers(strong, weak):
    """Strong, global batch 8 on [1, 2]: n1 runs batch 8 itself, batch 4 (n2's) gets solo-b4, once per repeat.
    Weak, batch 4 on [1, 2]: n1 already runs batch 4, so no control point at all."""
    solo = {p.name: read_run(p) for p in strong.dir.iterdir() if p.name.startswith("solo-")}
    assert sorted(solo) == ["solo-b4-r0", "solo-b4-r1"]
    for run_id, run in solo.items():
        assert run["status"] == "completed", run_id
        assert run["launcher"] == "single", "plain python -m scaling.train, no launcher"
        assert (run["world_size"], run["batch_size_per_rank"], run["global_batch_size"]) == (1, 4, 4)
        assert run["threads_per_process"] == strong.study_json["threads_per_process"]
        assert run["summary"]["comm_s"] is None, "no peer, no communication"
    assert strong.study_json["control_batches"] == [4] and strong.study_json["controls"] is True
    assert not [name for name in weak.entries if name.startswith("solo-")]
    assert weak.study_json["control_batches"] == []
    assert "controls: solo-b4 per repeat" in strong.proc.stdout


def test_strong_study_halves_the_per_rank_batch_and_keeps_the_global_batch(strong):
    for run_id, per_rank in (("n1-r0", 8), ("n1-r1", 8), ("n2-r0", 4), ("n2-r1", 4)):
        run = read_run(strong.dir / run_id)
        assert (run["batch_size_per_rank"], run["global_batch_size"]) == (per_rank, 8)


def test_weak_study_keeps_the_per_rank_batch_and_grows_the_global_batch(weak):
    for run_id, world in (("n1-r0", 1), ("n2-r0", 2)):
        run = read_run(weak.dir / run_id)
        assert (run["batch_size_per_rank"], run["global_batch_size"]) == (4, 4 * world)


def test_every_point_has_the_same_threads_per_process(strong):
    threads = {read_run(strong.dir / r)["threads_per_process"] for r in ("n1-r0", "n1-r1", "n2-r0", "n2-r1")}
    assert threads == {strong.study_json["threads_per_process"]}
    for run_id in ("n1-r0", "n2-r0"):
        env_seen = read_run(strong.dir / run_id)["provenance"]["env"]
        assert env_seen["OMP_NUM_THREADS"] == str(strong.study_json["threads_per_process"])
    assert f"{strong.study_json['threads_per_process']} thread(s) per process" in strong.proc.stdout


def test_study_json_holds_the_definition_and_every_outcome(strong):
    data = strong.study_json
    assert (data["kind"], data["nprocs"], data["repeats"], data["global_batch_size"]) == ("strong", [1, 2], 2, 8)
    assert data["batch_size_per_rank"] == {"1": 8, "2": 4}
    assert data["status"] == "completed"
    assert [(p["run_id"], p["status"], p["solo_batch"]) for p in data["points"]] == [
        ("n1-r0", "completed", None), ("n2-r0", "completed", None), ("solo-b4-r0", "completed", 4),
        ("n1-r1", "completed", None), ("n2-r1", "completed", None), ("solo-b4-r1", "completed", 4)]
    assert "train.global_batch_size=8" in data["overrides"] and "model.hidden=256" in data["overrides"]


def test_progress_names_point_repeat_elapsed_and_eta(strong):
    lines = [ln for ln in strong.proc.stdout.splitlines() if ln.startswith("[point ")]
    assert [ln.split("]")[0] for ln in lines] == [f"[point {i}/6" for i in range(1, 7)]
    assert "repeat 2/2" in lines[-1] and "elapsed" in lines[-1]
    assert "solo-b4-r0: solo control (1 process, no peer) at per-rank batch 4, repeat 1/2" in lines[2]
    assert "eta ?" in lines[0] and "eta ?" not in lines[-1], "after one point the time left is estimated"


def test_study_ends_with_the_report_table_and_findings(strong):
    out = strong.proc.stdout
    assert "world size" in out and "efficiency" in out
    assert "Strong scaling (global batch 8 fixed) from 1 process to 2" in out
    assert "why efficiency is lost" in out and "Of the " in out and " points of efficiency " in out
    assert (strong.dir / "report.html").exists() and (strong.dir / "results.csv").exists()


# -- resume -----------------------------------------------------------------------------------


def test_second_run_of_a_completed_study_runs_nothing(strong):
    before = {p.name: (p / "run.json").stat().st_mtime_ns for p in strong.dir.iterdir() if (p / "run.json").exists()}
    proc = run_study(strong.dir.parent, STRONG)
    assert proc.returncode == 0, explain(proc)
    after = {p.name: (p / "run.json").stat().st_mtime_ns for p in strong.dir.iterdir() if (p / "run.json").exists()}
    assert after == before, "no run folder added and none rewritten"
    assert proc.stdout.count("completed earlier, skipped") == 6
    assert "[point 1/4] n1-r0: 1 process" not in proc.stdout, "no point started"


def test_resuming_with_other_settings_is_refused(strong, capsys):
    code = study.entry([*TINY, f"paths.root={strong.dir.parent}", *STRONG, "train.steps=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "train.steps" in err and "tiny-strong" in err


# -- failures ---------------------------------------------------------------------------------


def test_failed_point_is_recorded_and_the_rest_completes(weak_failed):
    proc = weak_failed.proc
    assert proc.returncode == 1, explain(proc)
    failed, completed = weak_failed.runs["n1-r0"], weak_failed.runs["n2-r0"]
    assert failed["status"] == "failed" and "injected failure at world size 1" in failed["error"]
    assert completed["status"] == "completed", "the point after the failed one still ran"
    points = {p["run_id"]: p for p in weak_failed.study_json["points"]}
    assert points["n1-r0"]["status"] == "failed" and "injected failure" in points["n1-r0"]["error"]
    assert points["n2-r0"]["status"] == "completed"
    assert weak_failed.study_json["status"] == "failed"
    assert "1 point(s) failed: n1-r0" in proc.stderr


def test_resume_moves_the_failed_point_aside_and_runs_only_it(weak_failed, weak):
    proc = weak.proc
    assert proc.returncode == 0, explain(proc)
    assert read_run(weak.dir / "n1-r0")["status"] == "completed"
    aside = [name for name in weak.entries if name.startswith("n1-r0.failed-")]
    assert len(aside) == 1, weak.entries
    assert weak.runs[aside[0]]["status"] == "failed", "the failed attempt is kept, renamed"
    assert weak.runs["n2-r0"] == weak_failed.runs["n2-r0"], "the completed point was left alone"
    assert "n2-r0: completed earlier, skipped" in proc.stdout
    assert "moved aside" in proc.stdout
    assert {p["run_id"]: p["status"] for p in weak.study_json["points"]} == {
        "n1-r0": "completed", "n2-r0": "skipped"}


def test_fail_fast_stops_at_the_first_failed_point(tmp_path):
    args = ["study=strong", "study.name=ff", "study.nprocs=[1,2]", "train.global_batch_size=8",
            "study.fail_fast=true", FAILING_HOOK]
    proc = run_study(tmp_path, args, SCALING_TEST_FAIL_WORLD_SIZE="1")
    assert proc.returncode == 1, explain(proc)
    assert not (tmp_path / "ff" / "n2-r0").exists()
    points = {p["run_id"]: p["status"] for p in json.loads((tmp_path / "ff" / "study.json").read_text())["points"]}
    assert points == {"n1-r0": "failed", "n2-r0": "pending", "solo-b4-r0": "pending"}


def start_long_study(root: Path, ready_file: str) -> tuple[subprocess.Popen, list[psutil.Process], Path]:
    """A study whose one point trains for a very long time, once ``ready_file`` exists in its run folder;
    the study's process and every process of its job."""
    cmd = [sys.executable, "-m", "scaling.study", *TINY, f"paths.root={root}", "study=weak", "study.name=cc",
           "study.nprocs=[2]", "train.steps=100000", "train.log_every=1000"]
    proc = start(cmd)
    run_dir = root / "cc" / "n2-r0"
    ready = run_dir / ready_file
    try:
        wait_for(lambda: (ready.exists() and ready.stat().st_size > 0) or proc.poll() is not None, 120)
        assert ready.exists(), "the job never started"
        job = tree(proc.pid)[1:]
        assert len([p for p in job if "scaling.train" in " ".join(p.cmdline())]) >= 2, "no ranks found"
    except BaseException:
        end_tree(proc)
        raise
    return proc, job, run_dir


@pytest.mark.parametrize("when", ["at start-up", "while training"])
def test_ctrl_c_stops_the_running_job_and_every_rank(tmp_path, when):
    """SIGINT to the study ends torchrun and both ranks, and the point's run.json says failed, interrupted
    (docs: "Ctrl-C ends the job the same way, with `interrupted` as the cause"): whether the job is still
    setting up (run.json just written) or training (steps being recorded)."""
    proc, job, run_dir = start_long_study(tmp_path, "run.json" if when == "at start-up" else "logs/rank1.steps.jsonl")
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        end_tree(proc)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Run the same command again" in err
    _, alive = psutil.wait_procs(job, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    run = read_run(run_dir)
    assert run["status"] == "failed" and "interrupted" in run["error"], run.get("error")
    if when == "while training":
        assert "interrupted (Ctrl-C / SIGINT)" in run["error"], "the ranks themselves record the Ctrl-C"
    assert json.loads((tmp_path / "cc" / "study.json").read_text())["status"] == "interrupted"


def test_a_study_killed_outright_leaves_no_job_running(tmp_path):
    """SIGKILL (what the OOM killer sends) gives the study no chance to stop its job: the job must end by
    itself, ranks included, and record why."""
    proc, job, run_dir = start_long_study(tmp_path, "logs/rank1.steps.jsonl")
    try:
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(job, timeout=60)
        assert not alive, f"left running after the study was killed: {[' '.join(p.cmdline()) for p in alive]}"
    finally:
        end_tree(proc)
        for p in job:
            try:
                p.kill()
            except psutil.Error:
                pass
    run = read_run(run_dir)
    assert run["status"] == "failed" and "SIGTERM" in run["error"], run.get("error")


def test_a_second_study_in_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    """Two studies writing one folder would interleave their points and corrupt study.json: the second
    is refused in one line, before it runs anything, and the first goes on."""
    proc, job, run_dir = start_long_study(tmp_path, "logs/rank1.steps.jsonl")
    try:
        second = run_study(tmp_path, ["study=weak", "study.name=cc", "study.nprocs=[2]"], timeout_s=120)
        assert second.returncode == 2, explain(second)
        assert second.stderr.strip().splitlines()[-1] == (
            f"scaling.study: error: study 'cc' in {tmp_path / 'cc'} is being run by another process; "
            "wait for it or choose another study.name")
        assert proc.poll() is None and all(p.is_running() for p in job), "the first study goes on"
        assert read_run(run_dir)["status"] == "running"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=120)
        finally:
            end_tree(proc)
