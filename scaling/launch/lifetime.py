"""A job that ends with the process that started it.

A study or sweep starts each job in a session of its own (so that a terminal's Ctrl-C reaches the
study alone, which then stops the job in order). If the study itself is killed outright (SIGKILL,
the kernel's OOM killer), nothing is left to stop the job: its torchrun and ranks would go on
training, holding the cores and the run folder. Linux's parent-death signal closes that gap: the
kernel sends the job SIGTERM when the thread that started it exits, and torchrun passes SIGTERM on
to every rank, each of which records ``failed`` with the cause. Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child receive ``signum`` when the
    parent dies; None where the platform has no such signal. Call it from the thread that stays
    alive as long as the job should (the kernel watches the starting thread, not the process)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signum)

    return arm
