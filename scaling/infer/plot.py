"""``latency_throughput.png``: samples/s against p99 latency, one point per batch size, the budget as a line.

An offline-only run has no latency of its own: its samples/s are drawn against the batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KIND_COLORS = {"memory": "#C44E52", "arithmetic": "#4C72B0", None: "#555555"}


def draw(record: dict[str, Any], path: Path) -> Path:
    batches = sorted(record["batches"], key=lambda p: p["batch_size"])
    timed = all(p["latency_s"] for p in batches)
    xs = [p["latency_s"]["p99"] * 1e3 if timed else p["batch_size"] for p in batches]
    ys = [p["samples_per_s"] for p in batches]
    budget = record["latency_budget_ms"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.plot(xs, ys, color="#999999", lw=1, zorder=1)
    for p, x, y in zip(batches, xs, ys):
        ax.scatter([x], [y], color=KIND_COLORS.get(p.get("compute_bound"), "#555555"), s=36, zorder=2)
        ax.annotate(f"{p['batch_size']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if timed:
        ax.axvline(budget, color="black", ls="--", lw=1, label=f"budget {budget:g} ms p99")
    for kind in ("memory", "arithmetic"):
        if any(p.get("compute_bound") == kind for p in batches):
            ax.scatter([], [], color=KIND_COLORS[kind], label=f"{kind}-bound batch")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("p99 latency per query (ms)" if timed else "batch size (offline: no latency measured)")
    ax.set_ylabel(f"throughput (samples/s, {batches[0]['samples_per_s_from'].replace('_', ' ')})" + (f", {record['replicas']} replicas" if record.get("replicas", 1) > 1 else ""))
    ax.set_title(f"{record.get('exp', '')} inference on {record.get('device', '')}\n"
                 "one point per batch size (labelled)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
