"""slurm/train.sbatch, strong_scaling.sh and weak_scaling.sh on a real two-node Slurm.

The cluster (``slurm_fixture``) is Debian's slurmctld + two slurmd + munged on this
host; every job runs the real training job with a tiny CPU config. Each test reads the
job's output file and the records, not only the job state: a misconfigured node can
report COMPLETED with nothing done.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.jobs import measuring, wait_for
from tests.slurm_cluster import Job, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
# Small enough that a two-rank run takes seconds on two shared cores.
TINY = ("model.hidden=64 model.in_features=32 train.steps=3 train.warmup_steps=1 train.log_every=1 "
        "logger.wandb.mode=disabled hardware.peak_tflops=1")
STEPS = 3


def job_env(runs: Path, **extra: str) -> dict[str, str]:
    """What a user exports before sbatch: the interpreter first on PATH, EXP, OVERRIDES."""
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "EXP": "mlp", "OVERRIDES": TINY, "RUNS_ROOT": str(runs), **extra}


def read_run(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def steps_in(run_dir: Path) -> int:
    return sum(1 for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip())


def assert_ok(job: Job) -> None:
    assert job.state == "COMPLETED" and job.exit_code == 0, job.describe()
    assert f"job {job.job_id} ends with exit status 0" in job.output, job.describe()


def run_study(cluster: SlurmCluster, tmp: Path, script: str, **env: str) -> tuple[Job, Path]:
    runs = tmp / "runs"
    job = cluster.run_job(REPO / "slurm" / script, "--nodes=2", output=tmp / "job.out", cwd=REPO,
                          env=job_env(runs, NODES="1 2", **env))
    return job, runs / env["STUDY"]


# ----------------------------------------------------------------- one run
def test_train_sbatch_runs_one_job_over_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # As on a cluster where python comes from a module or venv: only SCALING_SETUP puts
    # this interpreter on the PATH the job starts with.
    setup = tmp_path / "env.sh"
    setup.write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\nexport TORCH_DISTRIBUTED_DEBUG=OFF\n')
    env = job_env(runs, SCALING_SETUP=str(setup), PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    job = slurm_cluster.run_job(REPO / "slurm" / "train.sbatch", "--nodes=2", "--cpus-per-task=2",
                                output=tmp_path / "job.out", cwd=REPO, env=env)
    assert_ok(job)
    assert f"sourcing {setup}" in job.output
    assert f"python: {Path(sys.executable).parent}/" in job.output
    (run_dir,) = (runs / "adhoc").iterdir()
    assert run_dir.name.startswith(f"mlp-n2-j{job.job_id}-")
    run = read_run(run_dir)
    assert run["status"] == "completed", run.get("error")
    assert run["launcher"] == "slurm"
    assert run["world_size"] == 2 and run["backend"] == "gloo"
    # Threads per rank follow --cpus-per-task (srun itself sets no OMP_NUM_THREADS).
    assert run["threads_per_process"] == 2
    seen = run["provenance"]["env"]
    assert seen["OMP_NUM_THREADS"] == "2" and seen["TORCH_DISTRIBUTED_DEBUG"] == "OFF"
    assert seen["MASTER_ADDR"] == "127.0.0.1"  # the first node's NodeAddr
    assert steps_in(run_dir) == STEPS
    assert f"records: {run_dir}" in job.output


def test_plain_srun_of_the_training_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The contract's `srun python -m scaling.train`, no script around it: rank 0's address from Slurm.

    The node names n1, n2 resolve nowhere; Slurm reaches them by NodeAddr, and so must
    the ranks (real clusters, too, may name nodes apart from their network names).
    """
    runs = tmp_path / "runs"
    script = tmp_path / "plain.sh"
    script.write_text(f"#!/bin/bash\nsrun --kill-on-bad-exit=1 python -m scaling.train +exp=mlp {TINY} "
                      f"paths.root={runs} dist.timeout_s=20\n")
    job = slurm_cluster.run_job(script, "--nodes=2", "--ntasks-per-node=1", output=tmp_path / "job.out",
                                env=job_env(runs))
    assert job.state == "COMPLETED" and job.exit_code == 0, job.describe()
    (run_dir,) = (runs / "adhoc").iterdir()
    run = read_run(run_dir)
    assert run["status"] == "completed" and run["launcher"] == "slurm" and run["world_size"] == 2


# ----------------------------------------------------------------- studies
@pytest.fixture(scope="module")
def strong_study(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Job, Path]:
    return run_study(slurm_cluster, tmp_path_factory.mktemp("strong"), "strong_scaling.sh",
                     STUDY="strong-test", GLOBAL_BATCH="32")


@pytest.fixture(scope="module")
def weak_study(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Job, Path]:
    return run_study(slurm_cluster, tmp_path_factory.mktemp("weak"), "weak_scaling.sh",
                     STUDY="weak-test", BATCH_PER_RANK="8")


def check_points(study: Path, kind: str, batches: dict[int, tuple[int, int]], controls: tuple[int, ...] = ()) -> None:
    """Each world size's run: completed under srun, its batch (per rank, global), its nodes; and the solo
    controls (one task, no peer) at the per-rank batches no 1-process point runs."""
    for batch in controls:
        run = read_run(study / f"solo-b{batch}-r0")
        assert run["status"] == "completed", run.get("error")
        assert run["launcher"] == "slurm" and run["world_size"] == 1 and run["batch_size_per_rank"] == batch
    for world, (per_rank, global_batch) in batches.items():
        run_dir = study / f"n{world}-r0"
        run = read_run(run_dir)
        assert run["status"] == "completed", run.get("error")
        assert run["launcher"] == "slurm" and run["study"] == study.name and run["study_kind"] == kind
        assert run["world_size"] == world
        assert run["batch_size_per_rank"] == per_rank and run["global_batch_size"] == global_batch
        assert steps_in(run_dir) == STEPS
    definition = json.loads((study / "study.json").read_text())
    assert definition["kind"] == kind and definition["nprocs"] == sorted(batches)
    assert [p["status"] for p in definition["points"]] == ["completed"] * (len(batches) + len(controls))
    assert [p["solo_batch"] for p in definition["points"] if p["solo_batch"] is not None] == list(controls)
    # Two slurmd on one host share its hostname; the ranks still ran on two Slurm nodes.
    assert read_run(study / "n2-r0")["nodes"] == 2


def test_strong_scaling_runs_every_node_count(strong_study: tuple[Job, Path]) -> None:
    job, study = strong_study
    assert_ok(job)
    check_points(study, "strong", {1: (32, 32), 2: (16, 32)}, controls=(16,))
    assert "n1-r0 completed in" in job.output and "n2-r0 completed in" in job.output


def test_weak_scaling_runs_every_node_count(weak_study: tuple[Job, Path]) -> None:
    job, study = weak_study
    assert_ok(job)
    check_points(study, "weak", {1: (8, 8), 2: (8, 16)})


@pytest.mark.parametrize("which", ["strong", "weak"])
def test_study_ends_with_its_report(which: str, request: pytest.FixtureRequest) -> None:
    job, study = request.getfixturevalue(f"{which}_study")
    assert_ok(job)
    assert f"report: {study / 'report.html'}" in job.output
    rows = (study / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 + (which == "strong"), rows  # a header, one row per point and per solo control
    assert (study / "report.md").is_file()


# ----------------------------------------------------------------- failures
def test_invalid_override_fails_the_job_visibly(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job, study = run_study(slurm_cluster, tmp_path, "strong_scaling.sh", STUDY="bad",
                           OVERRIDES=f"{TINY} dist.backend=carrier-pigeon")
    assert job.state == "FAILED" and job.exit_code == 2, job.describe()
    assert "scaling.study: error: dist.backend must be one of auto|gloo|nccl (got 'carrier-pigeon')" in job.output
    assert "Traceback" not in job.output
    # Every point would fail the same way: the study stops at the first.
    assert "[point" not in job.output
    assert not (study / "n1-r0").exists()


def wait_until_measuring(run_dir: Path, timeout_s: float = 120) -> None:
    """Until rank 0 has recorded a measured step of this run."""
    assert wait_for(lambda: measuring(run_dir), timeout_s, every_s=0.2), f"{run_dir} never started measuring"


# Long enough that the 2-node point is still running when the signal arrives; no solo control point, which
# would run those steps once more in each test without being read.
SLOW_STEPS = 800
SLOW = TINY.replace("train.steps=3", f"train.steps={SLOW_STEPS}").replace("train.log_every=1", "train.log_every=50") \
    + " study.controls=false"


def interrupt_second_point(cluster: SlurmCluster, tmp: Path, *sbatch_args: str, **env: str) -> tuple[int, Path]:
    """Submit a strong study; send the early-stop signal once its 2-node point measures."""
    runs = tmp / "runs"
    job_id = cluster.submit(REPO / "slurm" / "strong_scaling.sh", "--nodes=2", *sbatch_args,
                            output=tmp / "job.out", cwd=REPO,
                            env=job_env(runs, NODES="1 2", OVERRIDES=SLOW, **env))
    deadline = time.monotonic() + 180
    while not (candidates := list(runs.glob("*/n2-r0"))):
        assert time.monotonic() < deadline and cluster.in_queue(job_id), (tmp / "job.out").read_text()
        time.sleep(0.5)
    (run_dir,) = candidates
    wait_until_measuring(run_dir)
    # What --signal=B:USR1@<secs> does before the time limit: signal the batch shell.
    cluster.signal_batch(job_id, "USR1")
    return job_id, run_dir.parent


def check_stopped_point(record: Path) -> None:
    run = read_run(record)
    assert run["status"] == "failed"
    assert "SIGUSR1" in run["error"], run["error"]
    assert steps_in(record) >= 1  # the steps measured before the stop are kept


def test_early_stop_then_resubmission_skips_completed_points(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id, study = interrupt_second_point(slurm_cluster, tmp_path, "--no-requeue", STUDY="stopped")
    first = slurm_cluster.wait(job_id, tmp_path / "job.out")
    assert first.state == "FAILED" and first.exit_code == 3, first.describe()
    assert "received SIGUSR1" in first.output
    check_stopped_point(study / "n2-r0")
    done_before = (study / "n1-r0" / "run.json").read_bytes()

    # Other settings under the same name would mix two experiments in one study: refused.
    mixed = slurm_cluster.run_job(REPO / "slurm" / "strong_scaling.sh", "--nodes=2", output=tmp_path / "mixed.out",
                                  cwd=REPO, env=job_env(study.parent, NODES="1 2", STUDY="stopped"))
    assert mixed.state == "FAILED" and mixed.exit_code == 2, mixed.describe()
    assert "scaling.study: error: study 'stopped' in " in mixed.output
    assert "was run with other settings (train.log_every: 50 then, 1 now; train.steps: 800 then, 3 now)" in mixed.output
    assert "[point" not in mixed.output

    # Resubmit with the command the job printed, pasted into a shell as a user would.
    advice = first.output.split("to continue it, submit again with the same settings:\n", 1)[1].splitlines()[0]
    command = advice.split("] ", 1)[1].strip()
    assert command.startswith("STUDY='stopped' ") and " sbatch --nodes=2 " in command
    env = {**slurm_cluster.env, "PATH": job_env(study.parent)["PATH"] + ":" + slurm_cluster.env["PATH"]}
    proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = int(proc.stdout.split()[-1])  # "Submitted batch job N"
    second = slurm_cluster.wait(job_id, tmp_path / f"strong-scaling-{job_id}.out")
    assert_ok(second)
    assert "n1-r0: completed earlier, skipped" in second.output
    assert (study / "n1-r0" / "run.json").read_bytes() == done_before
    assert read_run(study / "n2-r0")["status"] == "completed"
    assert steps_in(study / "n2-r0") == SLOW_STEPS
    (attempt,) = study.glob("n2-r0.failed-*")
    check_stopped_point(attempt)


def test_early_stop_requeues_and_continues_the_same_study(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # No STUDY: the job names its study, and must find it again after the requeue.
    job_id, study = interrupt_second_point(slurm_cluster, tmp_path)
    assert re.fullmatch(rf"strong-j{job_id}-\d{{8}}-\d{{6}}", study.name), study.name
    # The requeued job runs the remaining point with the study's OVERRIDES (SLOW): the
    # test waits for it to measure, then lets it run out rather than stopping it again.
    job = slurm_cluster.wait(job_id, tmp_path / "job.out", timeout_s=400)
    assert_ok(job)
    assert job.info.get("Restarts") == "1", job.info
    assert f"requeueing job {job_id}" in job.output
    assert f"continuing study {study.name}" in job.output
    assert "n1-r0: completed earlier, skipped" in job.output
    assert [p.name for p in study.parent.iterdir()] == [study.name]
    assert read_run(study / "n2-r0")["status"] == "completed"
    (attempt,) = study.glob("n2-r0.failed-*")
    check_stopped_point(attempt)


# ----------------------------------------------------------------- sweeps
def test_a_study_sweep_runs_in_one_allocation_and_a_resubmission_skips_it(slurm_cluster: SlurmCluster,
                                                                          tmp_path: Path) -> None:
    """SWEEP: scaling.study -m inside the job, one study per combination, one comparison at the end."""
    runs = tmp_path / "runs"
    env = job_env(runs, NODES="2", STUDY="buckets", SWEEP="dist.bucket_cap_mb=1,5",
                  OVERRIDES=f"{TINY} study.controls=false")
    job = slurm_cluster.run_job(REPO / "slurm" / "strong_scaling.sh", "--nodes=2", output=tmp_path / "job.out",
                                cwd=REPO, env=env)
    assert_ok(job)
    sweep = runs / "buckets"
    for cap in (1, 5):
        run = read_run(sweep / f"bucket_cap_mb-{cap}" / "n2-r0")
        assert run["status"] == "completed" and run["launcher"] == "slurm" and run["nodes"] == 2
        assert run["bucket_cap_mb"] == cap and steps_in(sweep / f"bucket_cap_mb-{cap}" / "n2-r0") == STEPS
    assert json.loads((sweep / "sweep.json").read_text())["status"] == "completed"
    compare = (sweep / "compare" / "report.md").read_text()
    assert "bucket_cap_mb-1" in compare and "bucket_cap_mb-5" in compare and "bucket_cap_mb" in compare
    assert "buckets: 2 run, 0 completed earlier and skipped" in job.output

    again = slurm_cluster.run_job(REPO / "slurm" / "strong_scaling.sh", "--nodes=2", output=tmp_path / "again.out",
                                  cwd=REPO, env=env)
    assert_ok(again)
    assert "buckets: 0 run, 2 completed earlier and skipped" in again.output
    assert "[point" not in again.output


def test_under_sbatch_the_strategies_sweep_runs_in_the_allocation_and_a_resubmission_finds_it(slurm_cluster,
                                                                                               tmp_path) -> None:
    """OVERRIDES="study.strategies=[ddp,fsdp]" to strong_scaling.sh: the sweep's folder is named as SWEEP's
    (strong-sweep-j<job>), every point an srun step; submitted again with STUDY=<that folder>, nothing runs."""
    runs = tmp_path / "runs"
    env = job_env(runs, NODES="2", OVERRIDES=f"{TINY} study.controls=false study.strategies=[ddp,fsdp]")
    job = slurm_cluster.run_job(REPO / "slurm" / "strong_scaling.sh", "--nodes=2", output=tmp_path / "job.out",
                                cwd=REPO, env=env)
    assert_ok(job)
    folder = runs / f"strong-sweep-j{job.job_id}"
    for strategy in ("ddp", "fsdp"):
        run = read_run(folder / f"strategy-{strategy}" / "n2-r0")
        assert (run["status"], run["launcher"], run["nodes"], run["strategy_effective"]) == (
            "completed", "slurm", 2, strategy)
    compare = (folder / "compare" / "report.md").read_text()
    assert "At 2 processes fsdp holds 50% of ddp's model state per rank" in compare

    again = slurm_cluster.run_job(REPO / "slurm" / "strong_scaling.sh", "--nodes=2", output=tmp_path / "again.out",
                                  cwd=REPO, env={**env, "STUDY": folder.name})
    assert_ok(again)
    assert f"{folder.name}: 0 run, 2 completed earlier and skipped" in again.output
    assert "[point" not in again.output
