"""Intra-op threads per process: one rule for the training job and the study."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from scaling.config import ConfigError

THREAD_VARS = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")
"""Where a launcher (or the user) says how many cores a process has: mpiexec and srun set no thread count."""


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_threads(key: str, requested: Any, processes_here: int, environ: Mapping[str, str] | None = None) -> int:
    """``requested`` when it is not ``auto`` (``key`` names it in the error); else the first of
    ``THREAD_VARS`` set in ``environ`` (none given: none read); else the cores here shared by
    ``processes_here`` processes."""
    if requested != "auto":
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise ConfigError(f"{key} must be an integer >= 1 (got {requested!r})")
        return requested
    for var in THREAD_VARS:
        value = (environ or {}).get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, available_cores() // max(1, processes_here))
