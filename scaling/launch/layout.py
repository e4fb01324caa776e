"""Who launched this process, as a value: the rank layout a launcher announces.

The launchers' environment variables are named here once; ``scaling.launch.detect``
reads them. Plain Python (no torch), so that the command-line front door can
ask for this process's rank before anything heavy is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

LAUNCHERS = ("torchrun", "slurm", "mpi", "single")
RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
"""Each launcher's variable for this process's rank: torchrun, srun, Open MPI, MPICH/PMI, PMIx."""
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
"""Variables by which MPI launchers announce the world size."""


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


def launch_rank() -> int:
    """This process's rank as the launcher announced it (0 when there is none)."""
    for key in RANK_VARS:
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0
