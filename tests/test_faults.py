"""A rank that fails ends the job fast, names itself, and every measured step survives."""

from __future__ import annotations

import json
import os
import signal
import sys
import time


from tests.jobs import TINY, check, end_tree, load_run, only_run_dir, start, torchrun

LONG = [*TINY["mlp"], "train.steps=200", "train.warmup_steps=1", "train.log_every=4", "instrument.flops=false"]
FAULT_AFTER = 40  # buckets reduced on the faulty rank before it fails (a few per step)
# From the fault to the launcher's exit: the surviving rank notices, waits for the root cause
# (failure.WAIT_FOR_ROOT_CAUSE_S), writes the records, and torchrun stops what is left. A few
# seconds when idle; the rest is room for a loaded machine.
TEARDOWN_S = 20


def faulty_run(root, hook, extra=(), timeout=120):
    """The job with a fault on rank 1; ``since_fault`` is the time from the fault to the launcher's exit."""
    stamp = root.parent / "fault.stamp"
    proc = torchrun(2, [*LONG, f"comm.hook=tests.comm_hooks:{hook}", f"paths.root={root}", *extra],
                    env={"SCALING_TEST_FAULT_RANK": "1", "SCALING_TEST_FAULT_AFTER": str(FAULT_AFTER),
                         "SCALING_TEST_FAULT_STAMP": str(stamp)}, timeout=timeout)
    ended = time.time()
    assert stamp.exists(), f"the fault never fired\n{proc.stderr[-3000:]}"
    since_fault = ended - float(stamp.read_text())
    print(f"{hook}: the launcher exited {since_fault:.2f} s after the fault")
    run_dir = only_run_dir(root / "adhoc")
    run, steps = load_run(run_dir)
    return proc, since_fault, run_dir, run, steps


def kept_steps_are_whole(run_dir, steps):
    """steps.jsonl holds exactly the steps that both ranks finished."""
    per_rank = [{json.loads(l)["step"] for l in (run_dir / f"logs/rank{r}.steps.jsonl").read_text().splitlines() if l}
                for r in (0, 1)]
    assert [s["step"] for s in steps] == sorted(per_rank[0] & per_rank[1])
    assert len(steps) >= 5


def test_a_rank_that_raises(root):
    proc, since_fault, run_dir, run, steps = faulty_run(root, "raise_on_rank")
    assert proc.returncode != 0
    assert run["status"] == "failed"
    assert run["error"] == "rank 1 failed: ValueError: injected fault in a user hook"
    assert "rank 1 failed: ValueError: injected fault" in proc.stderr
    kept_steps_are_whole(run_dir, steps)
    assert run["summary"]["partial"] is True and run["summary"]["steps"] == len(steps)
    assert since_fault < TEARDOWN_S


def test_a_rank_that_is_killed(root):
    proc, since_fault, run_dir, run, steps = faulty_run(root, "kill_rank")
    assert proc.returncode != 0
    assert run["status"] == "failed"
    assert run["error"].startswith("rank 1 stopped without reporting an error")
    kept_steps_are_whole(run_dir, steps)
    assert since_fault < TEARDOWN_S


def test_a_rank_that_hangs_is_given_up_on_after_the_timeout(root):
    timeout_s = 5
    proc, since_fault, run_dir, run, steps = faulty_run(root, "hang_rank", extra=[f"dist.timeout_s={timeout_s}"])
    assert proc.returncode != 0
    assert run["status"] == "failed"
    assert run["error"].startswith("rank 1 stopped without reporting an error")
    assert "Timed out" in run["error"] or "timed out" in run["error"]
    kept_steps_are_whole(run_dir, steps)
    # dist.timeout_s is what ends it: not before the timeout (the other rank waited it out in
    # its all-reduce), and not long after (the default, 60 s, would far exceed this bound).
    assert timeout_s - 0.5 <= since_fault <= timeout_s + TEARDOWN_S


def test_ctrl_c_ends_cleanly_and_keeps_the_records(root):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scaling.train",
           *LONG, "train.steps=100000", f"paths.root={root}"]
    proc = start(cmd, merge_stderr=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until some steps are on disk
            runs = list((root / "adhoc").glob("*/steps.jsonl")) if (root / "adhoc").exists() else []
            if runs and len(runs[0].read_text().splitlines()) >= 8:
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the whole foreground group
        out, _ = proc.communicate(timeout=60)
    finally:
        end_tree(proc)
    assert proc.returncode != 0
    run_dir = only_run_dir(root / "adhoc")
    run, steps = load_run(run_dir)
    assert run["status"] == "failed"
    assert "interrupted" in run["error"]
    assert len(steps) >= 8
    assert "interrupted (Ctrl-C / SIGINT)" in out
    # torchrun itself prints a traceback for the signal it received; the ranks print none.
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out


def test_the_bare_loop_keeps_its_steps_too(root):
    proc, since_fault, run_dir, run, steps = faulty_run(root, "raise_on_rank", extra=["instrument.enabled=false"])
    assert proc.returncode != 0
    assert run["status"] == "failed" and run["error"].startswith("rank 1 failed: ValueError")
    kept_steps_are_whole(run_dir, steps)
    assert set(steps[0]) >= {"step", "step_s", "step_s_max", "step_s_min", "slowest_rank", "samples_per_s"}
    assert "comm_s" not in steps[0]


def test_a_rank_slow_to_its_bookkeeping_holds_no_step_of_any_rank(root):
    """Rank 1 reaches each log interval's gather 0.4 s late (its records thread sleeps first): the gather
    waits for it, the training does not. Every rank's log step stays far below the stall, every measured
    step is recorded, and the progress line still comes."""
    stall = 0.4
    proc = torchrun(2, [*TINY["mlp"], "train.steps=6", "train.warmup_steps=1", "train.log_every=2",
                        "instrument.flops=false", "instrument.ops=false", "instrument.control_steps=0",
                        f"paths.root={root}"], env={"SCALING_INJECT_STALL": f"records:{stall}@rank=1"}, timeout=120)
    out = check(proc)
    run, steps = load_run(only_run_dir(root / "adhoc"))
    assert run["status"] == "completed"
    assert [s["step"] for s in steps] == list(range(1, 7))
    # The stall was in the bookkeeping path: rank 0 waited for rank 1 in every interval's gather.
    assert run["records_gather"]["gathers"] == 3 and run["records_gather"]["gather_max_s"] > 0.75 * stall
    log_steps = [s for s in steps if s["step"] in (3, 5)]  # measured steps 2 and 4: the log steps
    assert max(s["step_s_max"] for s in log_steps) < stall / 2, log_steps
    assert max(s["other_s_max"] for s in steps) < stall / 4
    assert "step     2/6" in out and "step     6/6" in out
