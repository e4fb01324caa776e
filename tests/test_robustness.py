"""What goes wrong in real use: a loss that turns NaN, a run id used twice, a steps file cut short by a kill."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from tests.jobs import (QUICK, TINY, check, job_env, load_run, only_run_dir, read_run, report, run_command, single,
                        torchrun)
from tests.shared_runs import copy_study


def test_a_nan_loss_fails_the_run_with_one_clear_cause_and_keeps_its_steps(root: Path) -> None:
    """A learning rate of 1e30 sends the weights to inf within a few updates: the run must stop there and
    say so, not train on NaN for the remaining steps and report a step time as if nothing happened."""
    proc = torchrun(2, [*TINY["mlp"], "train.steps=40", "train.warmup_steps=1", "train.log_every=2",
                        "instrument.flops=false", "instrument.ops=false", "instrument.control_steps=0",
                        "optim.lr=1e30", f"paths.root={root}"])
    assert proc.returncode != 0
    run, steps = load_run(only_run_dir(root / "adhoc"))
    assert run["status"] == "failed"
    assert "NonFiniteLoss: the loss is nan at step" in run["error"] or "NonFiniteLoss: the loss is inf" in run["error"], \
        run["error"]
    stopped_at = int(run["error"].split(" at step ")[1].split(":")[0])
    assert stopped_at < 20, "found at the first log interval after the loss diverged, not at the end"
    assert steps and all(r["step"] <= stopped_at for r in steps), "the steps before the failure are kept"
    assert "NonFiniteLoss" in proc.stderr and proc.stderr.count("Traceback") <= 2


def test_a_reused_run_id_is_refused_and_the_first_run_is_left_alone(root: Path) -> None:
    args = [*TINY["mlp"], *QUICK, "instrument.ops=false", "paths.run_id=mine", f"paths.root={root}"]
    check(single(args))
    first = read_run(root / "adhoc" / "mine")
    again = single(args)
    assert again.returncode != 0
    assert "run folder" in again.stderr and "exists already; no run overwrites another" in again.stderr
    assert read_run(root / "adhoc" / "mine") == first, "the first run's record is untouched"


def test_a_steps_file_cut_short_by_a_kill_is_read_to_its_last_whole_line(strong, tmp_path: Path) -> None:
    """A job killed while writing leaves half a line at the end of steps.jsonl; the report counts the whole
    lines and reports on the rest of the study as before."""
    study = copy_study(strong.dir, tmp_path / "cut")
    run_dir = study / "n2-r1"
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    (run_dir / "steps.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    record = read_run(run_dir)
    record.update(status="failed", error="rank 1 stopped without reporting an error (killed by SIGKILL)")
    (run_dir / "run.json").write_text(json.dumps(record))
    check(report(study))
    with open(study / "results.csv", newline="") as f:
        rows = {r["run_id"]: r for r in csv.DictReader(f)}
    assert rows["n2-r1"]["status"] == "failed" and int(rows["n2-r1"]["measured_steps"]) == len(lines) - 1
    assert rows["n2-r0"]["status"] == "completed"
    with open(strong.dir / "results.csv", newline="") as f:
        before = {r["run_id"]: r for r in csv.DictReader(f)}
    assert rows["n2-r0"]["step_s"] == before["n2-r0"]["step_s"], "the whole runs read as before"


TEARDOWN_SCRIPT = """
import json, os
from scaling.config import DistConfig
from scaling.launch import group
from scaling.launch.layout import Launch

def gloo_workers():
    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop" for t in os.listdir("/proc/self/task"))

before = gloo_workers()
ctx = group.init(Launch("single", 0, 0, 1, 1), DistConfig(backend="gloo", bucket_cap_mb=1, timeout_s=60, threads=1))
assert ctx.gather_object({"rank": ctx.rank}) == [{"rank": 0}]
during = gloo_workers()
group.teardown(ctx)
print(json.dumps({"before": before, "during": during, "after": gloo_workers()}))
"""


def test_the_teardown_joins_the_bookkeeping_groups_gloo_workers() -> None:
    """A gloo worker still holding a finished gather's tensors when the interpreter finalizes aborts the
    process (SIGABRT after a run that succeeded: 2 of 19 two-process jobs here before the teardown joined
    the workers, 0 of 40 after). The world group and the bookkeeping group have a pool of workers each; the
    teardown leaves none. (A DDP model makes torch keep the world group's pool to the end of the process;
    its last collective, a gradient all-reduce, is released long before.)"""
    proc = run_command([sys.executable, "-c", TEARDOWN_SCRIPT], timeout_s=120, env=job_env())
    counts = json.loads(check(proc).strip().splitlines()[-1])
    assert counts["before"] == 0 and counts["during"] >= 2, counts
    assert counts["after"] == 0, counts
