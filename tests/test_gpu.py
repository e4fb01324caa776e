"""The CUDA/NCCL claims of the training job, on a GPU machine (skipped elsewhere, with the reason).

The same checks as ``scripts/gpu_check.sh``, which prints them as one table:
CUDA-event timing against the wall clock and a plain loop, the memory peak
against ``max_memory_allocated``, MFU against the right peak, a data stall, a
delay on the device per bucket and a stalled rank recovered in the right
category, and NCCL running.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parent.parent


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("group", ["single_gpu", "two_ranks", "nccl"])
def test_cuda_claims(group, tmp_path):
    module = gpu_check()
    check = module.Check()
    getattr(module, f"check_{group}")(check, tmp_path, *([30] if group == "single_gpu" else []))
    failed = [f"{r['check']}: {r['what']}: {r['measured']} (expected {r['expected']})" for r in check.rows if not r["ok"]]
    assert check.rows and not failed, "\n".join(failed)
