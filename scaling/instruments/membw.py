"""The memory bandwidth a process of this job can reach: a STREAM-style probe.

Keys (run.json ``hardware``): ``peak_membw_Bps`` (the best of the four kernels
below, bytes per second, per process) and ``membw_source`` (probe | config);
``stream`` holds each kernel's best rate.

The four kernels of McCalpin's STREAM, on arrays far larger than the last-level
cache (all of a host's probing processes together: ``array_bytes``) so that every byte comes from memory (on CUDA: device memory, copies from
device to device):

    copy   b = a          2 arrays of traffic
    scale  b = s * a      2
    add    c = a + b      3
    triad  a = b + s * c  3

Bytes are counted as STREAM counts them: every array read once and written
once, no write-allocate traffic. Like the GEMM probe, the probe runs with the
job's own threads while the job's other processes on the host probe too, so the
figure is one process's share of a shared memory system. Cached per host,
device, dtype, thread count and processes per host; ``hardware.peak_membw_GBps``
replaces it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scaling.instruments import flops
from scaling.instruments.flops import _device_name
from scaling.instruments import probecache

STREAM_KERNELS = ("copy", "scale", "add", "triad")
ARRAYS_MOVED = {"copy": 2, "scale": 2, "add": 3, "triad": 3}
"""Arrays read or written once per kernel (STREAM's own accounting)."""
MIN_ARRAY_BYTES = 64 * 2**20
CUDA_ARRAY_BYTES = 1 << 30


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache, from sysfs (None where it is not exposed)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        try:
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (ValueError, IndexError):
            continue
    return max(sizes) if sizes else None


MEMORY_SHARE = 0.25
"""At most this share of the host's available memory for the arrays of all its probing processes."""


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it is not exposed)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def array_bytes(device: torch.device, concurrent: int = 1) -> int:
    """Each array's size (on CUDA 1 GiB, some 20x an H100's L2).

    On a CPU the ``concurrent`` processes of a host probe at once and share its last-level cache: their
    arrays together make 4x that cache, each at least ``MIN_ARRAY_BYTES`` (so one process alone streams
    4x the cache, 16 processes a 16th of that each). The three arrays of every process stay within
    ``MEMORY_SHARE`` of the available memory: a host's probe costs the same memory whatever its
    process count (before, each of 16 processes took 4x a 260 MB cache per array, 50 GB in all)."""
    if device.type == "cuda":
        return CUDA_ARRAY_BYTES
    concurrent = max(1, concurrent)
    size = max(MIN_ARRAY_BYTES, 4 * (last_level_cache_bytes() or 0) // concurrent)
    available = available_memory_bytes()
    if available:
        size = min(size, int(MEMORY_SHARE * available) // (3 * concurrent))
    return max(size, 2**20)


def stream_probe(device: torch.device, dtype: torch.dtype = torch.float32, nbytes: int | None = None,
                 repeats: int = 5) -> dict[str, float]:
    """Best bytes per second of each STREAM kernel over ``repeats`` passes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = (nbytes or array_bytes(device)) // itemsize
    a = torch.full((n,), 1.0, device=device, dtype=dtype)
    b = torch.full((n,), 2.0, device=device, dtype=dtype)
    c = torch.zeros(n, device=device, dtype=dtype)
    s = 3.0
    kernels: dict[str, Callable[[], object]] = {
        "copy": lambda: b.copy_(a),
        "scale": lambda: torch.mul(a, s, out=b),
        "add": lambda: torch.add(a, b, out=c),
        "triad": lambda: torch.add(b, c, alpha=s, out=a),
    }
    best = {name: 0.0 for name in STREAM_KERNELS}
    for _ in range(repeats + 1):  # the first pass touches the pages and is not counted
        for name, kernel in kernels.items():
            seconds = _timed(kernel, device)
            if _ > 0:
                best[name] = max(best[name], ARRAYS_MOVED[name] * n * itemsize / seconds)
    return best


def _timed(kernel: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernel()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    kernel()
    return time.perf_counter() - t0


def cache_key(device: torch.device, dtype: torch.dtype, concurrent: int) -> str:
    return (f"{socket.gethostname()}|{_device_name(device)}|{device.type}|{dtype}"
            f"|threads={torch.get_num_threads()}|processes={concurrent}")


def peak_membw(device: torch.device, dtype: torch.dtype = torch.float32, concurrent: int = 1) -> dict[str, float]:
    """``{"peak_membw_Bps": best kernel, "<kernel>_Bps": ...}``, from the cache when probed before."""

    def probe() -> dict[str, float]:
        rates = stream_probe(device, dtype, nbytes=array_bytes(device, concurrent))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the probe's arrays must not count in the job's reserved memory
        return {"peak_membw_Bps": max(rates.values()), **{f"{k}_Bps": v for k, v in rates.items()}}

    return dict(probecache.cached("peak_membw", cache_key(device, dtype, concurrent), probe))


PRECISION_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                    "fp64": torch.float64}
"""The dtype each operator precision is probed with (TF32 is an fp32 product with TF32 allowed)."""


def measured_ceilings(peak_tflops: float | None, peak_membw_GBps: float | None, device: torch.device,
                      precisions: list[str], concurrent: int) -> dict[str, Any]:
    """Peak FLOP/s of each precision and peak bytes/s, with the ridge between them.

    Probed (cached) or taken from ``hardware.peak_tflops`` / ``hardware.peak_membw_GBps``;
    ``concurrent`` processes of the host probe at once, as they run at once.
    """
    if peak_tflops is not None:
        peaks, flops_source = {p: peak_tflops * 1e12 for p in precisions}, "config"
    else:
        peaks = {p: flops.peak_flops(device, PRECISION_DTYPES[p], concurrent=concurrent, tf32=p == "tf32")
                 for p in precisions}
        flops_source = "probe"
    if peak_membw_GBps is not None:
        peak_Bps, membw_source = peak_membw_GBps * 1e9, "config"
    else:
        peak_Bps, membw_source = peak_membw(device, concurrent=concurrent)["peak_membw_Bps"], "probe"
    return {"peak_flops_per_s": peaks, "peak_membw_Bps": peak_Bps,
            "ridge": {p: v / peak_Bps for p, v in peaks.items()},
            "peak_flops_source": flops_source, "peak_membw_source": membw_source}
