"""Everything that goes through MPI: rank discovery under ``mpiexec`` and the MPI gradient hook.

``discover()`` reads rank, world size and local rank from ``MPI.COMM_WORLD``
(mpi4py; MPICH, Open MPI or a cluster's own MPI) and agrees on the
torch.distributed rendezvous: rank 0 picks its address and a free port and
broadcasts both over MPI, so no ``MASTER_ADDR``/``MASTER_PORT`` is needed.

``mpi_allreduce_hook(state, bucket)`` is a DDP communication hook that sums the
gradient bucket with ``MPI_Allreduce`` and divides by the world size, so MPI's
all-reduce can be compared with gloo's inside real training.

mpi4py is imported on first use only: nothing else in the package needs it.

Running as root, or more ranks than cores: MPICH (``pip install 'scaling[mpi]'``
installs its PyPI wheel) needs nothing. Open MPI refuses both unless ``mpirun``
is told so in its own environment (our code starts too late to set it)::

    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # as root
    export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe        # Open MPI 5, more ranks than cores
    export OMPI_MCA_rmaps_base_oversubscribe=1                         # the same for Open MPI 4

mpi4py must use the MPI library of the ``mpiexec`` that starts it; a mismatch
shows as every rank being rank 0 of 1, which ``discover()`` reports.
"""

from __future__ import annotations

import os
import socket
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from scaling.config import ConfigError
from scaling.launch.layout import MPI_SIZE_VARS, Launch

INSTALL_HINT = "pip install 'scaling[mpi]' (MPICH from PyPI), or mpi4py built against your cluster's MPI"
# Gradient dtypes MPI can sum directly from a numpy view; others are summed in float32.
MPI_NATIVE_DTYPES = (torch.float32, torch.float64)


def load_mpi() -> ModuleType:
    """``mpi4py.MPI`` (initialises MPI), or a one-line ConfigError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigError(f"MPI launch needs mpi4py, which cannot be imported ({exc}); {INSTALL_HINT}") from None
    return MPI


def library_version() -> str:
    """First line of the MPI library's own version string (for provenance)."""
    return load_mpi().Get_library_version().strip().splitlines()[0].strip()


def _launcher_world_size() -> int | None:
    """The world size an MPI launcher announced; a job whose mpi4py sees a world of 1 under a larger
    one is using a different MPI library."""
    for key in MPI_SIZE_VARS:
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return None


def _free_port() -> int:
    # The kernel picks an unused port; it is released again for torch's store
    # to bind a moment later (the same race torchrun's own port choice has).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _address_towards(peer_host: str) -> str:
    """This host's address on the interface that routes to ``peer_host``.

    Connecting a UDP socket sends nothing; it only asks the kernel for a route.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((peer_host, 9))
            return str(sock.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _rendezvous(hostnames: list[str]) -> tuple[str, int]:
    """Rank 0's choice of MASTER_ADDR and MASTER_PORT (env values win when set)."""
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        others = [h for h in hostnames if h != hostnames[0]]
        addr = "127.0.0.1" if not others else _address_towards(others[0])
    port = os.environ.get("MASTER_PORT", "")
    return addr, int(port) if port.isdigit() else _free_port()


def discover() -> Launch:
    """The rank layout of an ``mpiexec``/``mpirun`` job and an agreed rendezvous."""
    MPI = load_mpi()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    announced = _launcher_world_size()
    if size == 1 and announced is not None and announced > 1:
        raise ConfigError(
            f"the MPI launcher started {announced} processes but mpi4py sees a world of 1: mpiexec and "
            f"mpi4py use different MPI libraries (mpi4py has {library_version()!r}); use the mpiexec that "
            "belongs to mpi4py's MPI"
        )
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    hostnames = world.allgather(MPI.Get_processor_name())
    addr, port = world.bcast(_rendezvous(hostnames) if rank == 0 else None, root=0)
    return Launch("mpi", rank=rank, local_rank=local_rank, world_size=size, local_world_size=local_size,
                  master_addr=addr, master_port=port)


def check_hook_launch(launch: Launch) -> None:
    """``comm.hook=mpi`` needs an MPI launch and mpi4py; checked before any process group exists."""
    if launch.launcher != "mpi":
        raise ConfigError(
            f"comm.hook=mpi needs an MPI launch (mpiexec -n N python -m scaling.train ...); "
            f"this job was launched by {launch.launcher}"
        )
    load_mpi()


def mpi_allreduce_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average the bucket over ranks with ``MPI_Allreduce``.

    ``state`` is ``None`` (``MPI.COMM_WORLD``) or an mpi4py communicator. The
    reduction is blocking, in place on a numpy view of the (CPU) bucket, and the
    returned future is already complete, so MPI's all-reduce does not overlap
    with the rest of backward the way gloo's asynchronous one does.
    """
    MPI = load_mpi()
    comm = MPI.COMM_WORLD if state is None else state
    size = comm.Get_size()
    if dist.is_initialized() and size != dist.get_world_size():
        raise ConfigError(
            f"comm.hook=mpi: MPI sees {size} ranks but torch.distributed has {dist.get_world_size()}; "
            "launch the job with mpiexec"
        )
    grads = bucket.buffer()
    work = grads.detach()
    if work.device.type != "cpu" or work.dtype not in MPI_NATIVE_DTYPES:
        work = work.to(device="cpu", dtype=torch.float32)
    work = work.contiguous()
    comm.Allreduce(MPI.IN_PLACE, work.numpy(), op=MPI.SUM)
    work.div_(size)
    if work.data_ptr() != grads.data_ptr():
        grads.copy_(work)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(grads)
    return future
