"""The real components some tests need, and the one rule for a missing one.

Slurm, network namespaces and MPI are installed by the project's own set-up
(``scripts/install_system_deps.sh``, the ``test`` extra): where one is missing the
test is skipped with the reason, but under ``CI=true`` it fails, since there a
missing component is a broken set-up, not a reason to pass. A CUDA device is not
part of any set-up: ``gpu`` tests skip where there is none, CI included.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

def _slurm_missing() -> str | None:
    from tests.slurm_cluster import why_unusable

    return why_unusable()


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc): apt-get install iproute2"
    probe = f"sncprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "`ip netns add` is not permitted here (needs CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed: pip install -e '.[test]' installs it with MPICH"
    from tests.jobs import mpiexec

    try:
        mpiexec()
    except RuntimeError as exc:
        return str(exc)
    return None


def _gpu_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA device: torch.cuda.is_available() is false here"


COMPONENTS = {"slurm": _slurm_missing, "netns": _netns_missing, "mpi": _mpi_missing, "gpu": _gpu_missing}
REQUIRED_UNDER_CI = {"slurm", "netns", "mpi"}
_missing: dict[str, str | None] = {}


def missing(component: str) -> str | None:
    """Why ``component`` cannot be used here, or None; asked once per run."""
    if component not in _missing:
        _missing[component] = COMPONENTS[component]()
    return _missing[component]


def require(component: str) -> None:
    """Skip the running test where ``component`` is missing, or fail it where CI must have it."""
    reason = missing(component)
    if reason is None:
        return
    if component in REQUIRED_UNDER_CI and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, and CI installs {component} for these tests, but: {reason}", pytrace=False)
    pytest.skip(reason)
