"""A user DDP communication hook for the study tests (``comm.hook=tests.study_hooks:allreduce_or_fail``).

Plain all-reduce, except that it raises on the world size named by
SCALING_TEST_FAIL_WORLD_SIZE: a point that fails at one size only, and only
while the variable is set (so that a resumed study can succeed).
"""

from __future__ import annotations

import os

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


def allreduce_or_fail(state, bucket):
    if os.environ.get("SCALING_TEST_FAIL_WORLD_SIZE") == str(dist.get_world_size()):
        raise RuntimeError(f"injected failure at world size {dist.get_world_size()}")
    return default_hooks.allreduce_hook(state, bucket)
