"""DDP communication hooks used by the tests as user hooks (``comm.hook=tests.comm_hooks:NAME``).

Each behaves like plain all-reduce plus one controlled effect, set through an
environment variable so that the training job itself is unchanged.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

_calls = {"n": 0}


_serial = threading.Lock()


def delayed_allreduce(state, bucket):
    """All-reduce whose completion is delayed by SCALING_TEST_DELAY_S per bucket.

    The delays are taken one bucket at a time, as on a single communication
    channel, so a step with B buckets is held up by B x delay in all.
    """
    delay = float(os.environ.get("SCALING_TEST_DELAY_S", "0"))

    def late(fut):
        with _serial:
            time.sleep(delay)
        return fut.value()

    return default_hooks.allreduce_hook(state, bucket).then(late)


def blocking_allreduce(state, bucket):
    """All-reduce done before the hook returns, as a blocking library call would be."""
    tensor = bucket.buffer()
    tensor.div_(dist.get_world_size())
    dist.all_reduce(tensor)
    future = torch.futures.Future()
    future.set_result(tensor)
    return future


def _fault_due() -> bool:
    """True on rank SCALING_TEST_FAULT_RANK once SCALING_TEST_FAULT_AFTER buckets were reduced.

    When it first turns true, the wall-clock time is written to the file
    SCALING_TEST_FAULT_STAMP names (if set), so that a test can time what
    follows from the fault itself rather than from the job's start.
    """
    _calls["n"] += 1
    due = (dist.get_rank() == int(os.environ.get("SCALING_TEST_FAULT_RANK", "1"))
           and _calls["n"] > int(os.environ.get("SCALING_TEST_FAULT_AFTER", "5")))
    stamp = os.environ.get("SCALING_TEST_FAULT_STAMP")
    if due and stamp and not os.path.exists(stamp):
        with open(stamp, "w") as out:
            out.write(repr(time.time()))
            out.flush()
            os.fsync(out.fileno())
    return due


def raise_on_rank(state, bucket):
    if _fault_due():
        raise ValueError("injected fault in a user hook")
    return default_hooks.allreduce_hook(state, bucket)


def kill_rank(state, bucket):
    if _fault_due():
        os.kill(os.getpid(), signal.SIGKILL)
    return default_hooks.allreduce_hook(state, bucket)


def hang_rank(state, bucket):
    if _fault_due():
        time.sleep(3600)
    return default_hooks.allreduce_hook(state, bucket)
