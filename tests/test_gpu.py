"""The CUDA/NCCL claims of the training job, on a GPU machine (skipped elsewhere, with the reason).

The groups of ``scripts/gpu_check.sh``, one test each (the script prints them as one table and
lists what it did not run): CUDA-event timing against the wall clock and a plain loop, the memory
peak against ``max_memory_allocated``, MFU against the right peak, a data stall, a device delay per
bucket and a stalled rank recovered in the right category, the NCCL DDP hook path, FSDP and ZeRO-1
exposure with a device delay recovered in the right kind, the fp16/bf16/PowerSGD hooks on CUDA,
operator pass labels, and with two or more GPUs the rank-to-device mapping and a 2-rank NCCL job.
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


GROUPS = list(gpu_check().GROUPS)


@pytest.mark.parametrize("group", GROUPS)
def test_cuda_claims(group, tmp_path):
    import torch

    module = gpu_check()
    needs = module.GROUPS[group][1]
    if torch.cuda.device_count() < needs:
        pytest.skip(f"{group} needs {needs} GPUs, {torch.cuda.device_count()} visible")
    check = module.Check()
    call = module.group_function(group)
    call(check, tmp_path, 30) if group == "single_gpu" else call(check, tmp_path)
    failed = [f"{r['check']}: {r['what']}: {r['measured']} (expected {r['expected']})" for r in check.rows if not r["ok"]]
    assert check.rows and not failed, "\n".join(failed)
