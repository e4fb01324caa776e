"""DDP communication hooks by name: torch's own, MPI, or a user's ``module:function``.

A user's hook has the signature ``hook(state, bucket) -> torch.futures.Future``
(see ``DistributedDataParallel.register_comm_hook``); ``state`` is ``None``,
meaning the default process group. It is wrapped and timed like the built-in ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from scaling.config import CommConfig, ConfigError, resolve_user_hook


@dataclass
class HookChoice:
    name: str
    hook: Any
    state: Any
    builtin_reducer: bool
    """True when DDP's C++ all-reduce does the same work without any Python hook."""


def resolve(comm: CommConfig, backend: str, launcher: str) -> HookChoice:
    """Pick the hook; everything that can be checked before a process group exists is checked here."""
    name = comm.hook
    if name == "allreduce":
        return HookChoice(name, default_hooks.allreduce_hook, None, builtin_reducer=True)
    if name == "fp16":
        return HookChoice(name, default_hooks.fp16_compress_hook, None, False)
    if name == "bf16":
        return HookChoice(name, default_hooks.bf16_compress_hook, None, False)
    if name == "powersgd":
        # The state needs the process group, so it is made in ``make_state``.
        return HookChoice(name, powerSGD_hook.powerSGD_hook, None, False)
    if name == "mpi":
        if launcher != "mpi":
            raise ConfigError("comm.hook=mpi needs the job to be launched with mpiexec (no MPI launcher detected)")
        from scaling.launch import mpi

        return HookChoice(name, mpi.mpi_allreduce_hook, None, False)
    return HookChoice(name, resolve_user_hook(name), None, False)


def make_state(choice: HookChoice, comm: CommConfig) -> Any:
    if choice.name == "powersgd":
        # PowerSGD runs plain all-reduce for its first iterations; start
        # compressing at once (2 is the smallest start it accepts) so that the
        # measured steps see the compressed traffic.
        return powerSGD_hook.PowerSGDState(process_group=dist.group.WORLD,
                                           matrix_approximation_rank=comm.powersgd_rank,
                                           start_powerSGD_iter=2)
    return choice.state
