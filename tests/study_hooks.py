"""A user DDP communication hook for the study tests (``comm.hook=tests.study_hooks:allreduce_or_fail``).

Plain all-reduce, except that a job of the world size named by SCALING_TEST_FAIL_WORLD_SIZE
fails: a point that fails at one size only, and only while the variable is set (so that a
resumed study can succeed). A single process trains without DDP and never calls the hook,
so the failure is raised from a global forward hook, registered when the job imports this
module to resolve ``comm.hook`` (at every world size, before training starts).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

FAIL_ENV = "SCALING_TEST_FAIL_WORLD_SIZE"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _fail_here() -> None:
    if os.environ.get(FAIL_ENV) == str(_world_size()):
        raise RuntimeError(f"injected failure at world size {_world_size()}")


def allreduce_or_fail(state, bucket):
    _fail_here()
    return default_hooks.allreduce_hook(state, bucket)


def _fail_in_forward(module, inputs, output) -> None:
    _fail_here()


if os.environ.get(FAIL_ENV):
    torch.nn.modules.module.register_module_forward_hook(_fail_in_forward)
