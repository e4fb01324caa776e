"""Where and with what a run ran: hosts, hardware, software, relevant environment."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

import scaling

ENV_PREFIXES = ("NCCL_", "GLOO_", "OMP_", "MKL_", "TORCH_DISTRIBUTED", "TORCH_NCCL", "CUDA_VISIBLE", "MASTER_",
                "SLURM_JOB", "SLURM_NTASKS", "SLURM_CPUS", "SLURM_NNODES", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)


def relevant_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables that change communication or threading; never anything secret-looking."""
    environ = dict(os.environ if environ is None else environ)
    return {
        key: value
        for key, value in sorted(environ.items())
        if key.startswith(ENV_PREFIXES) and not SECRET.search(key)
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    root = Path(scaling.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def collect(device: torch.device, hostnames: list[str]) -> dict[str, Any]:
    import torch  # the records package itself stays torch-free

    info: dict[str, Any] = {
        "hostnames": sorted(set(hostnames)),
        "rank_hosts": hostnames,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "scaling": scaling.__version__,
        "git_commit": git_commit(),
        "env": relevant_env(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        info["gpu"] = None
    return info
