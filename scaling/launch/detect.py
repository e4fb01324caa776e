"""``detect()``: who launched us (torchrun, srun, mpiexec or nobody), from the environment.

The only reader of launcher variables besides ``scaling.launch.layout``; Slurm's
node addresses come from ``scontrol``, MPI's layout from mpi4py (``scaling.launch.mpi``).
"""

from __future__ import annotations

import os
import re
import subprocess

from scaling.config import ConfigError
from scaling.launch.layout import MPI_SIZE_VARS, Launch


def _env_int(*keys: str, default: int | None = None) -> int:
    for key in keys:
        value = os.environ.get(key)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    if default is None:
        raise ConfigError(f"none of the environment variables {', '.join(keys)} is set")
    return default


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def slurm_master_addr() -> str:
    """The first node of the step, at the address Slurm itself reaches it by.

    A node's NodeName need not resolve (virtual nodes, clusters with separate
    management names); its NodeAddr does.
    """
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        return "127.0.0.1"
    match = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", hosts[0]))
    return match.group(1) if match else hosts[0]


def slurm_port(job_id: int, step: int = 0) -> int:
    """The rendezvous port of a job's ``step``-th training step: derived from the job id, so that two jobs on
    one node do not collide, and from the step, so that a step never waits for the previous one's socket."""
    return 20000 + (job_id % 1000) * 20 + step % 20


def detect() -> Launch:
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "LOCAL_RANK" in env and "WORLD_SIZE" in env):
        return Launch(
            "torchrun",
            rank=_env_int("RANK"),
            local_rank=_env_int("LOCAL_RANK"),
            world_size=_env_int("WORLD_SIZE"),
            local_world_size=_env_int("LOCAL_WORLD_SIZE", default=1),
            master_addr=env.get("MASTER_ADDR"),
            master_port=_env_int("MASTER_PORT", default=29500),
        )
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        job_id = _env_int("SLURM_JOB_ID", default=0)
        return Launch(
            "slurm",
            rank=_env_int("SLURM_PROCID"),
            local_rank=_env_int("SLURM_LOCALID", default=0),
            world_size=_env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
            local_world_size=_slurm_tasks_on_this_node(),
            master_addr=env.get("MASTER_ADDR") or slurm_master_addr(),
            master_port=_env_int("MASTER_PORT", default=slurm_port(job_id)),
        )
    if any(key in env for key in MPI_SIZE_VARS):
        from scaling.launch import mpi  # mpi4py is needed only under mpiexec

        return mpi.discover()
    return Launch("single", rank=0, local_rank=0, world_size=1, local_world_size=1)


def _slurm_tasks_on_this_node() -> int:
    # SLURM_TASKS_PER_NODE looks like "2(x3),1"; the step's own count is exact when present.
    if "SLURM_STEP_TASKS_PER_NODE" in os.environ or "SLURM_TASKS_PER_NODE" in os.environ:
        spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ["SLURM_TASKS_PER_NODE"]
        node_id = _env_int("SLURM_NODEID", default=0)
        counts: list[int] = []
        for part in spec.split(","):
            count, _, repeat = part.partition("(x")
            counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
        if node_id < len(counts):
            return counts[node_id]
    return 1
