"""A train sweep reported like a study, along the swept axis instead of the world size.

``python -m scaling.train -m train.batch_size=1,4,16`` leaves one run folder per
combination and ``sweep.json`` in ``<paths.root>/<sweep>``. This module reads
them (never torch) and writes, into that folder, ``sweep.csv``, ``sweep.md`` and
one figure per measure against the first swept key (the others, if any, are one
line or panel each): ``plots/sweep-breakdown.png`` (where the step goes),
``plots/sweep-step.png`` (median step time), ``plots/sweep-bound.png`` (the
verdict) and, where the runs have the op profile, ``plots/sweep-roofline.png``
(arithmetic vs memory share of the operator time). Repeats of a combination are
not a thing in a sweep: each point is the run's own median step.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.records.files import read_json
from scaling.records.schema import BOUNDS, SHARE_LABELS, SHARES
from scaling.report.study_folder import RunRecord, read_run

SWEEP_JSON = "sweep.json"
COLUMNS = ("step_s", "samples_per_s", *(f"{s}_frac" for s in SHARES), "bound", "arithmetic_frac", "memory_frac",
           "compute_bound")


@dataclass
class Point:
    combination: str
    values: dict[str, Any]
    """Swept key -> the value the run's config.yaml holds (typed), else the override's text."""
    run: RunRecord | None
    """None where the combination left no readable run folder."""

    @property
    def completed(self) -> bool:
        return self.run is not None and self.run.completed

    def number(self, key: str) -> float | None:
        return self.run.number(key) if self.run is not None else None


@dataclass
class SweepReport:
    name: str
    folder: Path
    keys: list[str]
    """Swept keys; the first is the x axis."""
    points: list[Point]
    plots: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def axis(self) -> str:
        return self.keys[0]

    def series(self) -> dict[str, list[Point]]:
        """Points by the values of the other swept keys (one series when one key is swept), x-ordered."""
        groups: dict[str, list[Point]] = {}
        for point in self.points:
            label = ", ".join(f"{k}={point.values.get(k)}" for k in self.keys[1:]) or self.name
            groups.setdefault(label, []).append(point)
        return {label: sorted(pts, key=lambda p: _order(p.values.get(self.axis))) for label, pts in groups.items()}


def _order(value: Any) -> tuple[int, Any]:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value) if number else (1, str(value))


def load(folder: Path) -> SweepReport:
    folder = Path(folder)
    data = read_json(folder / SWEEP_JSON)
    keys = [str(k) for k in data.get("swept") or []]
    points, warnings = [], []
    for combo in data.get("combinations") or []:
        name = str(combo.get("name"))
        run = None
        if (folder / name / "run.json").exists():
            run, warning = read_run(str(data.get("name") or folder.name), folder / name)
            if warning:
                warnings.append(warning)
        values = {k: (run.config.get(k, v) if run is not None else v) for k, v in (combo.get("swept") or {}).items()}
        points.append(Point(name, values, run))
    return SweepReport(str(data.get("name") or folder.name), folder, keys, points, warnings=warnings)


def rows(report: SweepReport) -> list[dict[str, Any]]:
    out = []
    for point in report.points:
        summary = point.run.summary if point.run is not None else {}
        out.append({"combination": point.combination, **{k: point.values.get(k) for k in report.keys},
                    "status": point.run.status if point.run is not None else "absent",
                    **{c: summary.get(c) for c in COLUMNS}})
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return "" if value is None else str(value)


def table_lines(report: SweepReport) -> list[str]:
    head = [*report.keys, "status", "step (ms)", "samples/s", "compute", "exposed comm", "data", "other", "bound",
            "arith/mem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows(report):
        step = row["step_s"] * 1e3 if isinstance(row["step_s"], (int, float)) else None
        shares = [f"{100 * row[f'{s}_frac']:.0f}%" if isinstance(row[f"{s}_frac"], (int, float)) else ""
                  for s in SHARES]
        ops = (f"{100 * row['arithmetic_frac']:.0f}% / {100 * row['memory_frac']:.0f}%"
               if isinstance(row["arithmetic_frac"], (int, float)) and isinstance(row["memory_frac"], (int, float))
               else "")
        cells = [*(_cell(row[k]) for k in report.keys), row["status"], _cell(step), _cell(row["samples_per_s"]),
                 *shares, _cell(row["bound"]), ops]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- figures ----------------------------------------------------------------------------------


def _positions(report: SweepReport) -> tuple[list[Any], bool]:
    """The x values in order, and whether they are numbers spanning enough to want a log axis."""
    values = sorted({p.values.get(report.axis) for p in report.points}, key=_order)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    wide = numeric and len(values) > 2 and min(values) > 0 and max(values) / min(values) >= 8
    return values, wide


def draw_all(report: SweepReport, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scaling.report.plots import SHARE_COLORS, _color, _finish

    folder.mkdir(parents=True, exist_ok=True)
    values, _ = _positions(report)
    index = {repr(v): i for i, v in enumerate(values)}
    series = report.series()
    axis_label = f"{report.axis}"
    paths = []

    def x_axis(ax: Any) -> None:
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([str(v) for v in values])
        ax.set_xlabel(axis_label)
        ax.grid(True, alpha=0.3)

    # Breakdown: a panel per series, a stacked bar per swept value.
    fig, axes = plt.subplots(len(series), 1, figsize=(7.5, 3.6 * len(series)), squeeze=False)
    for ax, (label, pts) in zip(axes[:, 0], series.items()):
        done = [p for p in pts if p.completed and p.number("step_s") is not None]
        xs = [index[repr(p.values.get(report.axis))] for p in done]
        bottom = [0.0] * len(done)
        for share in SHARES:
            heights = [(p.number(f"{share}_frac") or 0.0) * p.number("step_s") * 1e3 for p in done]
            ax.bar(xs, heights, 0.6, bottom=bottom, color=SHARE_COLORS[share], label=SHARE_LABELS[share])
            bottom = [b + h for b, h in zip(bottom, heights)]
        for x, top, p in zip(xs, bottom, done):
            ax.text(x, top, f"{p.run.summary.get('bound')}", ha="center", va="bottom", fontsize=8)
        x_axis(ax)
        ax.set_ylabel("time per step (ms)")
        ax.set_title(f"{label}: where the median step goes, by {report.axis}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(_finish(fig, folder / "sweep-breakdown.png", "bar: median step split by the shares of the "
                                                            "measured time; label: the bound"))

    # Step time and throughput.
    fig, (ax_step, ax_rate) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (label, pts) in enumerate(series.items()):
        done = [p for p in pts if p.completed]
        xs = [index[repr(p.values.get(report.axis))] for p in done]
        ax_step.plot(xs, [p.number("step_s") * 1e3 for p in done], "o-", color=_color(i), label=label)
        ax_rate.plot(xs, [p.number("samples_per_s") for p in done], "o-", color=_color(i), label=label)
    for ax, what in ((ax_step, "median step time (ms)"), (ax_rate, "samples/s (all ranks)")):
        x_axis(ax)
        ax.set_ylabel(what)
        ax.set_ylim(bottom=0)
    ax_rate.legend(fontsize=8)
    fig.suptitle(f"{report.name}: step time and throughput by {report.axis}", fontsize=10)
    paths.append(_finish(fig, folder / "sweep-step.png", "one run per point: its median over measured steps"))

    # Bound: the verdict as a category.
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for i, (label, pts) in enumerate(series.items()):
        done = [p for p in pts if p.completed and p.run.summary.get("bound") in BOUNDS]
        ax.plot([index[repr(p.values.get(report.axis))] for p in done],
                [BOUNDS.index(p.run.summary["bound"]) + 0.08 * i for p in done], "o", ms=9, color=_color(i),
                label=label)
    x_axis(ax)
    ax.set_yticks(range(len(BOUNDS)))
    ax.set_yticklabels([f"{b}-bound" for b in BOUNDS])
    ax.set_ylim(-0.5, len(BOUNDS) - 0.5)
    ax.set_title(f"{report.name}: what bounds the step, by {report.axis}")
    ax.legend(fontsize=8)
    paths.append(_finish(fig, folder / "sweep-bound.png", "the summary's bound: the largest of exposed "
                                                        "communication, waiting for a straggler, data, compute"))

    # Arithmetic vs memory share of the operator time (op profile).
    if any(p.number("arithmetic_frac") is not None for p in report.points):
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        for i, (label, pts) in enumerate(series.items()):
            done = [p for p in pts if p.number("arithmetic_frac") is not None]
            xs = [index[repr(p.values.get(report.axis))] for p in done]
            ax.plot(xs, [100 * p.number("arithmetic_frac") for p in done], "o-", color=_color(i),
                    label=f"{label}: arithmetic-bound")
            ax.plot(xs, [100 * (p.number("memory_frac") or 0.0) for p in done], "s--", color=_color(i),
                    label=f"{label}: memory-bound")
        x_axis(ax)
        ax.set_ylim(0, 100)
        ax.set_ylabel("share of operator time (%)")
        ax.set_title(f"{report.name}: arithmetic vs memory share, by {report.axis}")
        ax.legend(fontsize=8)
        paths.append(_finish(fig, folder / "sweep-roofline.png", "from the op profile (instrument.ops): operators "
                                                               "below the ridge are memory-bound"))
    return paths


# -- output -----------------------------------------------------------------------------------


def build(folder: Path) -> SweepReport:
    """Write sweep.csv, sweep.md and plots/sweep-*.png into the sweep folder."""
    report = load(folder)
    table = rows(report)
    with open(report.folder / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]) if table else ["combination"])
        writer.writeheader()
        writer.writerows(table)
    if any(p.completed for p in report.points):
        report.plots = draw_all(report, report.folder / "plots")
    figures = "\n".join(f"![{p.stem}](plots/{p.name})" for p in report.plots)
    (report.folder / "sweep.md").write_text(
        f"# Sweep {report.name}\n\nSwept: {', '.join(report.keys)} (x axis: {report.axis}).\n\n"
        + "\n".join(table_lines(report)) + f"\n\n{figures}\n")
    return report


def console_text(report: SweepReport) -> str:
    lines = [f"sweep {report.name}: {len(report.points)} combination(s) along {report.axis}", *table_lines(report)]
    lines += [f"warning: {w}" for w in report.warnings]
    lines.append(f"report: {report.folder / 'sweep.md'}, {report.folder / 'sweep.csv'}"
                 + (f", {len(report.plots)} figure(s) in {report.folder / 'plots'}" if report.plots else ""))
    return "\n".join(lines)


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / SWEEP_JSON).exists()


def command(folder: Path) -> str:
    """train | study: which command made the sweep."""
    return str(read_json(Path(folder) / SWEEP_JSON).get("command") or "train")


def study_folders(folder: Path) -> list[Path]:
    """A study sweep's study folders, in the order the sweep lists them."""
    names = [str(c.get("name")) for c in read_json(Path(folder) / SWEEP_JSON).get("combinations") or []]
    return [Path(folder) / n for n in names if (Path(folder) / n / "study.json").exists()]
