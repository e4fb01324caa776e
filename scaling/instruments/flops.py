"""FLOPs per sample, the device's peak FLOP/s, and model FLOP utilisation.

Keys: ``per_sample`` (forward + backward FLOPs of one sample, counted once with
``torch.utils.flop_counter``), ``achieved_per_s`` (per rank: per_sample x
samples per rank per second at the median step), ``peak_per_s`` (per rank: a
short GEMM probe on the device, or ``hardware.peak_tflops``), ``mfu``
(achieved / peak) and ``peak_source`` (probe | config).

The probe measures what one process of this job can reach with its own
threads and dtype, which is the honest denominator when several processes
share a host's cores. It is cached per host, device and thread count.
"""

from __future__ import annotations

import copy
import socket
import time

import torch

from scaling.instruments import probecache
from scaling.records.provenance import cpu_model


def count_step_flops(model: torch.nn.Module, loss_fn, batch, amp_dtype: torch.dtype | None) -> int:
    """FLOPs of one forward + backward on ``batch`` (gradients are cleared after)."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton where installed: only when counting

    inputs, targets = batch
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(inputs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(inputs), targets)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def count_step_flops_on_meta(model: torch.nn.Module, loss_fn, sample: tuple[torch.Tensor, torch.Tensor],
                             batch_size: int) -> int | None:
    """The same count on shapes alone: a copy of the model on the meta device, a batch of ``sample``'s shape.

    Nothing is computed and nothing touches the training device (its memory
    allocator, its first batch), and it costs no real forward and backward.
    FLOPs do not depend on the dtype, so autocast is left out. None when an
    operator of the model has no meta implementation.
    """
    from torch.utils.flop_counter import FlopCounterMode

    inputs, targets = (torch.as_tensor(t) for t in sample)
    try:
        meta_model = copy.deepcopy(model).to("meta")
        meta_inputs = torch.empty((batch_size, *inputs.shape), dtype=inputs.dtype, device="meta")
        meta_targets = torch.empty((batch_size, *targets.shape), dtype=targets.dtype, device="meta")
        with FlopCounterMode(display=False) as counter:
            loss_fn(meta_model(meta_inputs), meta_targets).backward()
    except (NotImplementedError, RuntimeError):
        return None
    return int(counter.get_total_flops())


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def gemm_probe_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 0.3) -> float:
    """Best FLOP/s of square matrix products of the given dtype on ``device``."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops_per_mm = 2 * size**3
    best = 0.0
    deadline = time.perf_counter() + seconds
    torch.mm(a, b)  # warm-up: kernels selected, pages touched
    while True:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                torch.mm(a, b)
            end.record()
            end.synchronize()
            best = max(best, 10 * flops_per_mm / (start.elapsed_time(end) / 1e3))
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, flops_per_mm / (time.perf_counter() - t0))
        if time.perf_counter() > deadline:
            return best


def runs_in_tf32(device: torch.device, dtype: torch.dtype, convolutions: bool) -> bool:
    """Whether the model's fp32 FLOPs really run in TF32 on this device.

    PyTorch lets cuDNN use TF32 for fp32 convolutions by default, but runs
    fp32 matrix products in full fp32 unless told otherwise: a ResNet's peak
    is the TF32 one, a transformer's or an MLP's the fp32 one (some 8x lower
    on an H100), unless the user enabled TF32 matmuls.
    """
    if device.type != "cuda" or dtype != torch.float32:
        return False
    return torch.backends.cudnn.allow_tf32 if convolutions else torch.backends.cuda.matmul.allow_tf32


def cache_key(device: torch.device, dtype: torch.dtype, concurrent: int, tf32: bool = False) -> str:
    """Where ``peak_flops`` keeps its figure: host, device, precision, threads and processes per host."""
    return (f"{socket.gethostname()}|{_device_name(device)}|{device.type}|{'tf32' if tf32 else dtype}"
            f"|threads={torch.get_num_threads()}|processes={concurrent}")


def peak_flops(device: torch.device, dtype: torch.dtype, concurrent: int = 1, tf32: bool = False) -> float:
    """The probe's result, from the cache when this host, device, threads and concurrency were probed before.

    ``concurrent`` processes of the job probe at once on this host, as they
    train at once: on a CPU they share cores and memory bandwidth. ``tf32``:
    probe fp32 products with TF32 (see ``runs_in_tf32``).
    """
    tf32 = tf32 and device.type == "cuda" and dtype == torch.float32
    key = cache_key(device, dtype, concurrent, tf32)

    def probe() -> float:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            return gemm_probe_flops(device, dtype)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    return float(probecache.cached("peak_flops", key, probe))
