"""The commbench figure: bus bandwidth against message size, with the fitted α–β model over the points."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from scaling.bench.commfit import Fit

MARKERS = {"torch": "o", "mpi": "s"}
COLOURS = {"all_reduce": "tab:blue", "all_gather": "tab:orange", "reduce_scatter": "tab:green",
           "broadcast": "tab:red"}


class Point(Protocol):
    op: str
    transport: str
    bytes: int

    @property
    def busbw_GBps(self) -> float: ...


def plot_busbw(points: Sequence[Point], fits: Sequence[Fit], path: Path, title: str) -> None:
    """Write a PNG: one marker per measured (op, transport, size), a line per fitted model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.5, 5), dpi=110)
    groups = dict.fromkeys((p.transport, p.op) for p in points)
    for transport, op in groups:
        rows = [p for p in points if p.transport == transport and p.op == op]
        ax.plot([p.bytes for p in rows], [p.busbw_GBps for p in rows], MARKERS.get(transport, "^"),
                color=COLOURS.get(op), label=f"{op} ({transport})", alpha=0.85)
        fitted = next((f for f in fits if f.op == op and f.transport == transport), None)
        if fitted is not None:
            sizes = np.geomspace(min(p.bytes for p in rows), max(p.bytes for p in rows), 200)
            linestyle = "-" if transport == "torch" else "--"
            bandwidth = "∞" if fitted.bandwidth_GBps is None else f"{fitted.bandwidth_GBps:.3g} GB/s"
            ax.plot(sizes, [fitted.busbw_GBps(s) for s in sizes], linestyle, color=COLOURS.get(op), linewidth=1,
                    label=f"fit: α={fitted.alpha_s * 1e6:.3g} µs, B={bandwidth}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s, 1e9 B/s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"commbench: {title}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
