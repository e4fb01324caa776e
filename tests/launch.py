"""Starting real multi-process jobs from the tests: torchrun, mpiexec, or one plain process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Variables by which a launcher around pytest itself would leak into the jobs started here.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "SLURM_STEP_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                 "PMI_RANK", "PMIX_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def mpiexec() -> str:
    """The mpiexec that belongs to the Python running the tests (the MPICH wheel's)."""
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("no mpiexec on PATH: pip install -e '.[test]' installs MPICH with the mpi extra")
    return found


def run(cmd: list[str], timeout_s: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=job_env(**env), capture_output=True, text=True, timeout=timeout_s)


def run_mpi(nprocs: int, args: list[str], timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return run([mpiexec(), "-n", str(nprocs), sys.executable, *args], timeout_s)


def run_torchrun(nprocs: int, args: list[str], timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}", *args],
               timeout_s)


def check(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc.stdout


def only_run_dir(study_dir: Path) -> Path:
    runs = [p for p in study_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder in {study_dir}, found {runs}"
    return runs[0]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
