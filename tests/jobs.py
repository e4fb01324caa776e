"""Starting the real jobs the tests read, the way a user starts them, and ending every one of them.

One place for the launchers (torchrun, mpiexec, one plain process, a study, the report), the
environment a job gets, the tiny configurations and the readers of a run's records.

Every process started here runs in a session of its own with SIGINT, SIGTERM and SIGQUIT at
their defaults, whatever the shell that started pytest did to them (a shell puts background
commands' SIGINT to "ignore", and an ignored signal stays ignored across exec), and it is ended,
with every process below it, when its test stops waiting for it (time-out, failure, or
interruption). ``tests/conftest.py`` checks after each test that nothing it started is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
NETNS_TOOL = str(REPO / "scripts" / "netns_cluster.py")  # emulated hosts and links (network namespaces)

# Variables by which a launcher around pytest itself (torchrun, srun, mpiexec) or a user's shell
# would leak into the jobs started here.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_JOBID",
                 "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_NODELIST",
                 "SLURM_JOB_NODELIST", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK",
                 "PMIX_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_FULL_ERROR", "SCALING_INJECT_STALL",
                 "SCALING_TEST_FAIL_WORLD_SIZE")

# wandb has tests of its own; elsewhere its start-up would only slow the jobs down.
NO_WANDB = "logger.wandb.mode=disabled"
# Small enough for a 2-core machine, large enough that every instrument has work.
TINY = {
    "mlp": ["+exp=mlp", "model.hidden=256", "model.in_features=64", "model.layers=2", "train.batch_size=4",
            "data.num_samples=256", NO_WANDB],
    "resnet": ["+exp=resnet", "data.image_size=16", "train.batch_size=4", "data.num_samples=64", NO_WANDB],
    "transformer": ["+exp=transformer", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=128",
                    "model.vocab_size=256", "data.seq_len=16", "train.batch_size=4", "data.num_samples=64", NO_WANDB],
}
QUICK = ["train.steps=4", "train.warmup_steps=1", "train.log_every=2", "instrument.flops=false"]
# The studies' points: an MLP whose 2-process job takes seconds.
STUDY_TINY = ["+exp=mlp", "model.hidden=256", "model.in_features=64", "train.batch_size=4", "data.num_samples=64",
              "train.steps=3", "train.warmup_steps=1", "instrument.flops=false", NO_WANDB]
# The strategies' MLP (tests/test_strategy.py derives its byte counts from these shapes): hidden width,
# hidden layers, classes.
STRATEGY_SHAPE = (256, 4, 5)
STRATEGY_MLP = ["+exp=mlp", f"model.in_features={STRATEGY_SHAPE[0]}", f"model.hidden={STRATEGY_SHAPE[0]}",
                f"model.layers={STRATEGY_SHAPE[1]}", f"data.num_classes={STRATEGY_SHAPE[2]}", "train.batch_size=4",
                "data.num_samples=256", NO_WANDB, "optim=adamw", "optim.lr=0.01", "train.steps=4",
                "train.warmup_steps=1", "train.log_every=2", "instrument.flops=false", "instrument.ops=false",
                "instrument.control_steps=0"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- environment and processes ------------------------------------------------------------------


def job_env(extra: dict[str, str] | None = None, **more: str) -> dict[str, str]:
    """The test run's environment without any launcher's variables, this checkout first on the path,
    one thread per process unless a test says otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra or {})
    env.update(more)
    return env


def _defaults_in_child() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def start(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path = REPO, merge_stderr: bool = False,
          **popen: Any) -> subprocess.Popen[str]:
    """A process in a session of its own, with the signals a user's terminal would deliver at their defaults.

    ``env`` is the whole environment (``job_env()`` when None). End it with ``end_tree``."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.STDOUT if merge_stderr else subprocess.PIPE)
    return subprocess.Popen(list(cmd), cwd=cwd, env=job_env() if env is None else env, text=True,
                            start_new_session=True, preexec_fn=_defaults_in_child, **popen)


def tree(pid: int) -> list[psutil.Process]:
    """The process and everything below it (torchrun's ranks run in sessions of their own, so a
    process group does not reach them)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def end_tree(proc: subprocess.Popen[str], grace_s: float = 0.0) -> None:
    """End ``proc`` and everything below it. With a grace, ``proc`` alone is sent SIGTERM first and given
    ``grace_s`` to stop what it started (as a scheduler would stop it); then whatever is left is killed."""
    family = tree(proc.pid)
    if grace_s > 0 and proc.poll() is None:
        _signal(family[0], signal.SIGTERM)
        _, family = psutil.wait_procs(family, timeout=grace_s)
    for p in family:
        _signal(p, signal.SIGKILL)
    psutil.wait_procs(family, timeout=10)
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def run_command(cmd: Sequence[str], timeout_s: float = 300, env: dict[str, str] | None = None, cwd: Path = REPO,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to the end, its output captured. Past ``timeout_s`` it is killed with everything it
    started and the test fails with the tails of its output."""
    proc = start(cmd, env=env, cwd=cwd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    try:
        out, err = proc.communicate(input=stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        end_tree(proc)
        raise AssertionError(f"timed out after {timeout_s:.0f} s and was killed: {' '.join(cmd)}") from None
    except BaseException:
        end_tree(proc)
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def torchrun(nproc: int, overrides: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300,
             module: str | None = "scaling.train", cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """A real ``torchrun --standalone`` job; ``env`` adds to ``job_env()``. With ``module=None`` the
    overrides are torchrun's own arguments after the launcher options (a script and its arguments)."""
    target = ["-m", module] if module else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target,
           *overrides]
    return run_command(cmd, timeout, env=job_env(env), cwd=cwd)


def single(overrides: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300,
           module: str = "scaling.train", cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``python -m scaling.train`` (or another module) with no launcher."""
    return run_command([sys.executable, "-m", module, *overrides], timeout, env=job_env(env), cwd=cwd)


def mpiexec() -> str:
    """The mpiexec that belongs to the Python running the tests (the MPICH wheel's)."""
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("no mpiexec on PATH: pip install -e '.[test]' installs MPICH with the mpi extra")
    return found


def run_mpi(nprocs: int, args: Sequence[str], timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return run_command([mpiexec(), "-n", str(nprocs), sys.executable, *args], timeout_s)


def study(root: Path, args: Sequence[str], timeout_s: float = 600, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``python -m scaling.study`` on the tiny MLP, its records under ``root``."""
    cmd = [sys.executable, "-m", "scaling.study", *STUDY_TINY, f"paths.root={root}", *args]
    return run_command(cmd, timeout_s, env=job_env(extra_env))


def report(*args: str | Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return run_command([sys.executable, "-m", "scaling.report", *map(str, args)], timeout_s)


def wait_for(condition, timeout_s: float, every_s: float = 0.1) -> bool:
    """Poll ``condition`` until it is true or ``timeout_s`` has passed; its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return bool(condition())


def measuring(run_dir: Path) -> bool:
    """Whether rank 0 of the run in ``run_dir`` has recorded a measured step (its set-up is over)."""
    steps = run_dir / "logs" / "rank0.steps.jsonl"
    return steps.exists() and steps.stat().st_size > 0


def wakeup_lateness_s(samples: int = 60, sleep_s: float = 0.001) -> float:
    """How late this host wakes a sleeping thread right now: the 90th percentile of how far past ``sleep_s``
    a sleep ends. A live-latency check's slack grows with it (a busy or shared host wakes threads late by
    milliseconds, an idle one by tens of microseconds)."""
    late = []
    for _ in range(samples):
        began = time.perf_counter()
        time.sleep(sleep_s)
        late.append(time.perf_counter() - began - sleep_s)
    late.sort()
    return late[int(0.9 * (len(late) - 1))]


# -- results ------------------------------------------------------------------------------------


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{(proc.stdout or '')[-4000:]}\n--- stderr\n{(proc.stderr or '')[-5000:]}"


def check(proc: subprocess.CompletedProcess[str]) -> str:
    """The job's stdout, once it is known to have exited 0."""
    assert proc.returncode == 0, explain(proc)
    return proc.stdout


def only_run_dir(folder: Path) -> Path:
    """The one run folder of a study folder (``<root>/adhoc`` for a single job)."""
    runs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder in {folder}, found {runs}"
    return runs[0]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def read_run(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / "run.json")


def read_steps(run_dir: Path, name: str = "steps.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return read_run(run_dir), read_steps(run_dir)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR)."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
