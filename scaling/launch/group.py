"""The process group: ``init()`` creates it, pins the device and sets the threads; ``teardown()`` undoes it.

``Context`` is this process's live distributed state; ``agree_on_run_dir`` is how
every command's ranks come to write into one run folder.
"""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaling.config import ConfigError, DistConfig
from scaling.launch.layout import Launch
from scaling.launch.threads import resolve_threads
from scaling.records.files import create_run_dir


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


def cuda_device_index(local_rank: int, local_world_size: int, device_count: int, backend: str) -> int:
    """The GPU of this process: its local rank, one GPU per process.

    NCCL refuses two ranks on one GPU (a duplicate-GPU error that reads like the ranks
    not reaching each other): more local processes than visible GPUs is a config error.
    gloo moves CUDA tensors through the host and lets processes share a GPU.
    """
    if device_count < 1:
        raise ConfigError("dist.device=cuda: no CUDA device is visible; use dist.device=auto or cpu")
    if local_world_size > device_count and backend == "nccl":
        raise ConfigError(f"dist.backend=nccl: {local_world_size} processes on this node and {device_count} visible "
                          f"GPU{'s' if device_count > 1 else ''}: NCCL needs a GPU of its own per process; start at "
                          f"most {device_count} per node (--nproc_per_node, PROCS_PER_NODE) or use dist.backend=gloo")
    return local_rank % device_count


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

    def agree_on_run_dir(self, study_dir: Path, run_id: str | None, prefix: str) -> Path:
        """Rank 0 claims the run folder and tells everyone; no rank derives it from its own clock."""
        run_dir: Any = None
        error: str | None = None
        if self.is_main:
            try:
                run_dir = str(create_run_dir(study_dir, run_id, prefix))
            except OSError as exc:
                error = str(exc)
        run_dir, error = self.broadcast_object((run_dir, error))
        if error:
            raise ConfigError(error)
        return Path(run_dir)

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.meta_group)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.meta_group)
        return out

    def gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """All ranks' ``tensor`` stacked along a new first dimension (CPU, gloo)."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.meta_group)
        return torch.stack(out)


def init(launch: Launch, cfg: DistConfig) -> Context:
    backend = resolve_backend(cfg.backend)
    threads = resolve_threads("dist.threads", cfg.threads, launch.local_world_size, os.environ)
    torch.set_num_threads(threads)
    if resolve_device(cfg.device, backend) == "cuda":
        device = torch.device("cuda", cuda_device_index(launch.local_rank, launch.local_world_size,
                                                        torch.cuda.device_count(), backend))
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


def teardown(ctx: Context | None = None) -> None:
    """Destroy the process groups, and with them their gloo worker threads, while the interpreter is whole.

    A gloo worker releases a finished collective's tensors after the caller has already moved on, and
    releasing a tensor that Python has seen takes the GIL. A worker that takes it once the interpreter
    has begun to finalize is ended by Python in the middle of a C++ destructor: the process aborts
    ("terminate called without an active exception", SIGABRT) after a run that had succeeded; one
    2-process job in ten did, on the rank with least to do after the last gather. A group is
    destroyed, and its workers joined, once nothing refers to it: the context's reference to the
    bookkeeping group is dropped, and the cycles that hold the trainer's model (and through it the
    world group) are collected here rather than during finalization.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if ctx is not None:
        ctx.meta_group = None
    gc.collect()
