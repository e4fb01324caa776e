"""Is the host itself well? A short probe on every rank before and after the measured steps.

The cached ceilings (``scaling.instruments.flops`` and ``membw``) are measured once per host and then
trusted: they cannot see a node that throttles, or a neighbour that takes a core, while a run runs. So
every rank runs a short form of the same two probes just before its first measured step and just after
its last one:

- ``gemm``: square fp32 matrix products of ``GEMM_SIZE`` (on CUDA ``CUDA_GEMM_SIZE``) for ``WINDOW_S``;
- ``membw``: STREAM's copy kernel (``b = a``, two arrays of traffic) on arrays of ``ARRAY_BYTES`` for
  ``WINDOW_S``.

Each figure is what the host *delivered* over the window: all the work done divided by the window's
wall time, not the best single product. A core shared with another process gives this rank only its
turns, and the figure says so (a best-of would find one lucky product between the neighbour's turns).
Cost: two windows of 40 ms each per probe, plus the set-up (about 10 ms on CPU): some 0.1 s per probe
and 0.2 s per run, outside every measured step.

A rank's host is called **slow** when its GEMM or its copy figure is below ``SLOW_RATIO`` (0.7) at both
probes, before and after the measured steps, of

1. the cached ceiling (the fp32 GEMM probe's ``peak_flops``, the STREAM probe's ``peak_membw_Bps``; or
   ``hardware.peak_tflops`` / ``hardware.peak_membw_GBps`` from the config), or
2. with peers, the other ranks' median of the same probe at the same time.

The first catches a host slower than it was when its ceiling was cached; the second a host slower than
its peers now, whatever the cache says. Both probes must fall short: on a shared machine one 25 ms window
can land on a neighbour's burst (single probes of one idle rank here read 60 to 150 GFLOP/s within
seconds), and a host that is slow for the run is slow at both ends of it. A slowdown that starts in the
middle of the run and shows only in the "after" probe is recorded, not named. Only ceilings already in
the cache are read (none is probed for this); without one, the first rule has nothing to compare with. The short copy works on arrays smaller than the cached probe's
(``membw.array_bytes``), so on a host with a large last-level cache it can read above the ceiling; the
ratio is recorded as it is and only a shortfall counts.

The other way round, a GEMM ceiling **below what the host delivered** (every rank above
``LOW_CEILING_RATIO``, 1.5, of it at both probes) is recorded as ``ceiling_below_delivered``: the cached
probe was taken while the host was busy (or the configured ``hardware.peak_tflops`` is wrong), and MFU and
the op profile's ridge, measured against it, read high.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

GEMM_SIZE = 512
CUDA_GEMM_SIZE = 4096
ARRAY_BYTES = 16 * 2**20
CUDA_ARRAY_BYTES = 256 * 2**20
WINDOW_S = 0.025
SLOW_RATIO = 0.7
"""Below this share of the ceiling, or of the other ranks' median, the host is named slow."""
LOW_CEILING_RATIO = 1.5
"""Above this multiple of the GEMM ceiling on every rank at both probes, the ceiling itself is too low."""
PROBES = ("before", "after")
RULES = (("gflops_of_ceiling", "GEMM at a share of the ceiling of"),
         ("GBps_of_ceiling", "copy bandwidth at a share of the ceiling of"),
         ("gflops_of_peers", "GEMM at a share of the other ranks' median of"),
         ("GBps_of_peers", "copy bandwidth at a share of the other ranks' median of"))
"""What each ratio is compared with, and how a reason names it."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _delivered(work: float, kernel, device: torch.device, window_s: float) -> float:
    """Work per second over a window of ``kernel`` calls (one untimed call first)."""
    kernel()
    _sync(device)
    count = 0
    t0 = time.perf_counter()
    while True:
        kernel()
        count += 1
        if device.type == "cuda":
            if count % 8:
                continue
            _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= window_s:
            return work * count / elapsed


def gemm_delivered(device: torch.device, window_s: float = WINDOW_S) -> float:
    """FLOP/s that fp32 matrix products reached over the window."""
    n = CUDA_GEMM_SIZE if device.type == "cuda" else GEMM_SIZE
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return _delivered(2.0 * n**3, lambda: torch.mm(a, b, out=out), device, window_s)


def copy_delivered(device: torch.device, window_s: float = WINDOW_S) -> float:
    """Bytes/s that STREAM's copy reached over the window (two arrays of traffic per copy)."""
    nbytes = CUDA_ARRAY_BYTES if device.type == "cuda" else ARRAY_BYTES
    a = torch.ones(nbytes // 4, device=device)
    b = torch.empty(nbytes // 4, device=device)  # its pages are touched by the untimed first copy
    return _delivered(2.0 * nbytes, lambda: b.copy_(a), device, window_s)


def probe(device: torch.device, window_s: float = WINDOW_S) -> dict[str, float]:
    """One probe: ``flops_per_s``, ``membw_Bps`` and what the probe cost (``seconds``)."""
    t0 = time.perf_counter()
    flops = gemm_delivered(device, window_s)
    bandwidth = copy_delivered(device, window_s)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"flops_per_s": flops, "membw_Bps": bandwidth, "seconds": time.perf_counter() - t0}


def cores() -> list[int] | None:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def record(table: list[list[float]], hosts: list[str], cores_of: list[list[int] | None],
           ceiling_flops: float | None, ceiling_Bps: float | None, flops_source: str | None,
           membw_source: str | None) -> dict[str, Any]:
    """run.json ``host_probe`` from every rank's two probes.

    ``table[rank]`` = [before flops/s, before B/s, before s, after flops/s, after B/s, after s]. Per rank:
    GFLOP/s and GB/s at each probe, their ratio to the ceiling and to the other ranks' median, and
    whether its host is slow (with the reasons); ``slow_ranks`` lists them.
    """
    world = len(table)
    ranks = []
    for r, row in enumerate(table):
        entry: dict[str, Any] = {"rank": r, "host": hosts[r] if r < len(hosts) else None,
                                 "cores": cores_of[r] if r < len(cores_of) else None}
        for i, when in enumerate(PROBES):
            flops, bandwidth, seconds = row[3 * i: 3 * i + 3]
            others = [table[o][3 * i: 3 * i + 2] for o in range(world) if o != r]
            entry[when] = {
                "gflops": flops / 1e9, "GBps": bandwidth / 1e9, "seconds": seconds,
                "gflops_of_ceiling": flops / ceiling_flops if ceiling_flops else None,
                "GBps_of_ceiling": bandwidth / ceiling_Bps if ceiling_Bps else None,
                "gflops_of_peers": flops / statistics.median(o[0] for o in others) if others else None,
                "GBps_of_peers": bandwidth / statistics.median(o[1] for o in others) if others else None,
            }
        reasons = []
        for key, what in RULES:
            values = [entry[when][key] for when in PROBES]
            if all(v is not None and v < SLOW_RATIO for v in values):
                reasons.append(f"{what} {values[0]:.2f} before and {values[1]:.2f} after the measured steps")
        entry["slow"] = bool(reasons)
        entry["reasons"] = reasons
        ranks.append(entry)
    delivered = [entry[when]["gflops_of_ceiling"] for entry in ranks for when in PROBES]
    return {"ceiling_gflops": ceiling_flops / 1e9 if ceiling_flops else None,
            "ceiling_GBps": ceiling_Bps / 1e9 if ceiling_Bps else None,
            "ceiling_flops_source": flops_source, "ceiling_membw_source": membw_source,
            "ceiling_below_delivered": bool(delivered) and all(v is not None and v > LOW_CEILING_RATIO
                                                              for v in delivered),
            "slow_ratio": SLOW_RATIO, "window_s": WINDOW_S,
            "slow_ranks": [e["rank"] for e in ranks if e["slow"]], "ranks": ranks}


def pin(local_rank: int, local_world_size: int) -> list[int] | None:
    """``dist.pin``: this process and its threads on its own share of the cores it may use.

    The cores are split in ``local_world_size`` contiguous, equal parts (the remainder unused); local rank
    ``i`` takes part ``i``. Returns the cores, or None where affinity cannot be set."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    per = max(1, len(available) // max(1, local_world_size))
    mine = available[(local_rank * per) % len(available):][:per]
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:
            pass
    return mine
