"""Everything about processes and process groups, in one place.

``detect()`` reads who launched us (torchrun, srun, mpiexec or nobody) from the
environment; ``init()`` creates the process group, pins the device and sets the
threads; ``teardown()`` undoes it. Nothing else in the package reads launcher
variables.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from scaling.config import ConfigError, DistConfig

MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class Launch:
    """Rank layout announced by the launcher."""

    launcher: str  # torchrun | slurm | mpi | single
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None


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


def _slurm_master_addr() -> str:
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
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(),
            # A port derived from the job id, so two jobs on one node do not collide.
            master_port=_env_int("MASTER_PORT", default=20000 + job_id % 20000),
        )
    if any(key in env for key in MPI_SIZE_VARS):
        from scaling import mpi  # mpi4py is needed only under mpiexec

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


def resolve_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ConfigError("dist.backend=nccl needs CUDA, and no CUDA device is visible; use dist.backend=gloo or auto")
    return requested


def resolve_device(requested: str, backend: str) -> str:
    """cuda or cpu: CUDA with NCCL, or when asked for (gloo all-reduces CUDA tensors through the host)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device=cuda needs CUDA, and no CUDA device is visible; use dist.device=auto or cpu")
    if requested == "auto":
        return "cuda" if backend == "nccl" else "cpu"
    return requested


def resolve_threads(requested: int | str, launch: Launch) -> int:
    """Intra-op threads per process: explicit, because mpiexec and srun set none."""
    if requested != "auto":
        return int(requested)
    for key in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        if os.environ.get(key, "").isdigit() and int(os.environ[key]) > 0:
            return int(os.environ[key])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, launch.local_world_size))


@dataclass
class Context:
    """The live distributed state of this process."""

    launch: Launch
    backend: str
    device: torch.device
    threads: int
    meta_group: Any
    """A gloo group for bookkeeping (run id, metrics gathers), kept off the gradient path."""
    hostnames: list[str]
    node_ids: list[str]
    """Per rank, the node it runs on: the launcher's node index where it has one."""

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def nodes(self) -> int:
        return len(set(self.node_ids))

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.meta_group)
        return box[0]

    def gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """All ranks' ``tensor`` stacked along a new first dimension (CPU, gloo)."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.meta_group)
        return torch.stack(out)


def init(launch: Launch, cfg: DistConfig) -> Context:
    backend = resolve_backend(cfg.backend)
    threads = resolve_threads(cfg.threads, launch)
    torch.set_num_threads(threads)
    if resolve_device(cfg.device, backend) == "cuda":
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=cfg.timeout_s)
    if launch.launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        addr = launch.master_addr or "127.0.0.1"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{launch.master_port}" if launch.launcher != "torchrun" else "env://",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
            **({"device_id": device} if backend == "nccl" else {}),
        )
    meta_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.new_group(timeout=timeout)
    placement: list[Any] = [None] * launch.world_size
    dist.all_gather_object(placement, (socket.gethostname(), node_id(launch.launcher)), group=meta_group)
    return Context(launch, backend, device, threads, meta_group, [p[0] for p in placement], [p[1] for p in placement])


def node_id(launcher: str) -> str:
    """Which node this process is on.

    The launcher's node index when it gives one (torchrun's GROUP_RANK, Slurm's
    SLURM_NODEID): several nodes can share a host name, as virtual Slurm nodes
    or network-namespace hosts on one machine do. Else the host name.
    """
    key = {"torchrun": "GROUP_RANK", "slurm": "SLURM_NODEID"}.get(launcher, "")
    if os.environ.get(key, "").isdigit():
        return f"node{os.environ[key]}"
    return socket.gethostname()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
