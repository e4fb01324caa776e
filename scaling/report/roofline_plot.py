"""Roofline figures, from the records alone (``ops.json``, ``run.json``).

- ``roofline.png`` in a run's folder: the measured ceilings as lines (one flat
  roof per precision the operators use, one slope for memory bandwidth), each
  operator as a point at its intensity and achieved FLOP/s, sized by its time,
  the largest labelled. Operators without FLOPs (copies, normalisations) cannot
  sit on a log FLOP/s axis; the title says how much time they took.
- ``plots/roofline.png`` in a study's report: how the memory-bound share of
  compute (``memory_frac``) moves with world size, one line per per-rank batch.

``python -m scaling.report.roofline_plot RUN_DIR [RUN_DIR ...]`` draws the first for
single runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scaling.instruments import roofline  # noqa: E402
from scaling.records.files import OPS_JSON  # noqa: E402
from scaling.report.metrics import StudyStats  # noqa: E402

PASS_COLORS = {"forward": "#4C72B0", "backward": "#C44E52", "optimizer": "#55A868"}
ROOF_STYLES = {"fp32": "-", "tf32": "--", "bf16": "-.", "fp16": ":", "fp64": (0, (1, 3))}
DPI = 110
LABELLED = 6


PASS_ABBREVIATIONS = {"forward": "fwd", "backward": "bwd", "optimizer": "opt"}


def _label(row: dict[str, Any]) -> str:
    return f"{PASS_ABBREVIATIONS.get(row['pass'], row['pass'])} {roofline.short_name(row['op'])}"


def draw_run(ops: dict[str, Any], path: Path, title: str = "") -> Path:
    """The roofline of one run's profiled operators."""
    hardware, rows = ops["hardware"], ops["rows"]
    peak_Bps = hardware["peak_membw_Bps"]
    total = sum(r["time_s"] for r in rows) or 1.0
    shown = [r for r in rows if r["flops"] > 0 and r["bytes"] > 0 and r["time_s"] > 0]
    hidden = total - sum(r["time_s"] for r in shown)
    ridges = list(hardware["ridge"].values())
    intensities = [r["intensity"] for r in shown] + ridges
    low, high = min(intensities) / 4, max(intensities) * 4
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [low * (high / low) ** (i / 200) for i in range(201)]
    for precision, peak in sorted(hardware["peak_flops_per_s"].items(), key=lambda item: item[1]):
        ax.plot(xs, [min(peak, x * peak_Bps) for x in xs], color="black", lw=1.4,
                ls=ROOF_STYLES.get(precision, "-"),
                label=f"{precision} peak {peak / 1e9:.1f} GFLOP/s (ridge {peak / peak_Bps:.1f} FLOP/B)")
    ax.plot([], [], color="none", label=f"memory {peak_Bps / 1e9:.1f} GB/s (slope)")
    for phase, color in PASS_COLORS.items():
        points = [r for r in shown if r["pass"] == phase]
        if points:
            ax.scatter([r["intensity"] for r in points], [r["achieved_flops_per_s"] for r in points],
                       s=[20 + 1500 * r["time_s"] / total for r in points], color=color, alpha=0.6,
                       edgecolors="black", linewidths=0.5, label=phase)
    for r in sorted(shown, key=lambda r: -r["time_s"])[:LABELLED]:
        ax.annotate(f"{_label(r)} {100 * r['time_s'] / total:.0f}%", (r["intensity"], r["achieved_flops_per_s"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_xlabel("arithmetic intensity (FLOP per byte of inputs and outputs)")
    ax.set_ylabel("achieved FLOP/s")
    summary = ops.get("summary") or {}
    heading = title or "roofline"
    if summary.get("compute_bound"):
        heading += (f"\n{summary['compute_bound']}-bound (arithmetic {100 * summary['arithmetic_frac']:.0f}%, "
                    f"memory {100 * summary['memory_frac']:.0f}% of operator time)")
    ax.set_title(heading, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.01, f"points sized by time; not shown: operators without FLOPs, "
                         f"{100 * hidden / total:.0f}% of operator time ({ops['steps']} profiled steps, "
                         f"rank {ops.get('rank', 0)}, {ops.get('time_source', '')})", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_run_dir(run_dir: Path) -> Path | None:
    """``run_dir/roofline.png`` from its ops.json; None without one."""
    ops_path = Path(run_dir) / OPS_JSON
    if not ops_path.exists():
        return None
    ops = json.loads(ops_path.read_text())
    return draw_run(ops, Path(run_dir) / "roofline.png", title=Path(run_dir).name)


def draw_study(studies: Sequence[StudyStats], path: Path) -> Path | None:
    """Memory-bound share of compute against world size, a line per (study, per-rank batch)."""
    series: dict[tuple[str, int | None], list[tuple[int, float]]] = {}
    for st in studies:
        for run in st.records.runs:
            frac = run.summary.get("memory_frac")
            if run.completed and frac is not None:
                series.setdefault((st.label, run.batch_per_rank), []).append((run.world_size, frac))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, ((study, batch), points) in enumerate(sorted(series.items(), key=lambda item: str(item[0]))):
        by_size: dict[int, list[float]] = {}
        for size, frac in points:
            by_size.setdefault(size, []).append(frac)
        sizes = sorted(by_size)
        medians = [100 * sorted(by_size[s])[len(by_size[s]) // 2] for s in sizes]
        name = f"batch {batch} per rank" if len(studies) == 1 else f"{study}, batch {batch} per rank"
        ax.plot(sizes, medians, marker="o", color=plt.get_cmap("tab10")(index % 10), label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("processes")
    ax.set_ylabel("memory-bound share of compute (%)")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_title("Within compute: memory-bound (above 50%) or arithmetic-bound (below)", fontsize=10)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_all(studies: Sequence[StudyStats], folder: Path) -> list[Path]:
    """Each run's roofline.png, in the run's own folder; returns the study's ``folder/roofline.png`` (if any)."""
    for st in studies:
        for run in st.records.runs:
            draw_run_dir(run.folder)
    study_plot = draw_study(studies, folder / "roofline.png")
    return [study_plot] if study_plot else []


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m scaling.report.roofline_plot RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    status = 0
    for run_dir in argv:
        path = draw_run_dir(Path(run_dir))
        if path is None:
            print(f"{run_dir}: no {OPS_JSON} (run with instrument.ops=true)", file=sys.stderr)
            status = 1
        else:
            print(path)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
