"""The report's figures (matplotlib, Agg: no display needed).

Every figure has a log-2 world-size axis, units on both axes and a legend.
Markers are medians over repeats; error bars span the smallest to the largest
repeat (min-max), as the note under each figure says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from scaling.report.waterfall import SizeWaterfall, ms, ms_decimals, procs  # noqa: E402
from scaling.report.metrics import Spread, StudyStats  # noqa: E402
from scaling.report.study_folder import collectives  # noqa: E402
from scaling.records.schema import MEMORY_CATEGORIES, MEMORY_LABELS, SHARE_LABELS, SHARES  # noqa: E402

SHARE_COLORS = {"compute": "#4C72B0", "comm_exposed": "#C44E52", "data": "#DD8452", "other": "#8C8C8C"}
MEMORY_COLORS = {"params": "#4C72B0", "grads": "#55A868", "optimizer_state": "#8172B3", "activations": "#DD8452",
                 "comm_buffers": "#C44E52"}
SPREAD_NOTE = "markers: median over repeats; error bars: min-max over repeats"
DPI = 110


def _color(index: int) -> str:
    return plt.get_cmap("tab10")(index % 10)


def _sizes(studies: Sequence[StudyStats]) -> list[int]:
    return sorted({s.world_size for st in studies for s in st.sizes})


def _log2_axis(ax: Axes, sizes: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes))
    ax.set_xticklabels([str(n) for n in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    low, high = min(sizes), max(sizes)
    ax.set_xlim(low / 1.4, high * 1.4)
    ax.set_xlabel("world size (processes, log2 scale)")
    ax.grid(True, which="major", alpha=0.3)


def _yerr(spreads: Sequence[Spread], scale: float = 1.0) -> list[list[float]] | None:
    """Min-max around the median; none at all when every point has a single run (no spread to show)."""
    if all(s.count == 1 for s in spreads):
        return None
    return [[(s.median - s.low) * scale for s in spreads], [(s.high - s.median) * scale for s in spreads]]


INTERVAL_NOTE = "markers: median over repeats; error bars: 95% bootstrap interval (steps within runs, repeats across runs)"


def _interval_yerr(sizes: Sequence[Any], key: str, spreads: Sequence[Spread],
                   scale: float = 1.0) -> list[list[float]] | None:
    """The 95% bootstrap interval of ``key`` around each median (scaling.report.intervals); the min-max over
    repeats where a size has no interval."""
    found = [s.intervals.get(key) for s in sizes]
    if any(f is None for f in found):
        return _yerr(spreads, scale)
    return [[max(0.0, (m.median - f.low)) * scale for m, f in zip(spreads, found)],
            [max(0.0, (f.high - m.median)) * scale for m, f in zip(spreads, found)]]


def _finish(fig: Figure, path: Path, note: str | None = SPREAD_NOTE) -> Path:
    if note:
        fig.text(0.01, 0.005, note, fontsize=8, color="#555555", ha="left", va="bottom")
    lines = note.count("\n") + 1 if note else 0
    fig.tight_layout(rect=(0, 0.16 * lines / fig.get_figheight(), 1, 1))  # about one 8-pt line per 0.16 inch
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _spans_decades(values: Sequence[float]) -> bool:
    """True when one linear axis would flatten some of the values (studies of very different size)."""
    positive = [v for v in values if v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > 20


def _title(studies: Sequence[StudyStats], what: str) -> str:
    if len(studies) == 1:
        return f"{studies[0].label} ({studies[0].kind} scaling): {what}"
    return what


def throughput(studies: Sequence[StudyStats], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    handles: list = []
    for i, st in enumerate(studies):
        sizes = [s for s in st.sizes if s.samples_per_s]
        if not sizes:
            continue
        xs = [s.world_size for s in sizes]
        spreads = [s.samples_per_s for s in sizes]
        handles.append(ax.errorbar(xs, [s.median for s in spreads], yerr=_interval_yerr(sizes, "samples_per_s", spreads),
                                   color=_color(i),
                                   marker="o", capsize=4, label=f"{st.label} (measured)"))
        base = sizes[0]
        ideal = [base.samples_per_s.median * n / base.world_size for n in xs]
        handles += ax.plot(xs, ideal, color=_color(i), linestyle="--", alpha=0.6,
                           label=f"{st.label} ideal (linear from {base.world_size})")
    _log2_axis(ax, _sizes(studies))
    medians = [s.samples_per_s.median for st in studies for s in st.sizes if s.samples_per_s]
    if len(studies) > 1 and _spans_decades(medians):
        ax.set_yscale("log")
        ax.set_ylabel("throughput (samples/s, global; log scale)")
    else:
        ax.set_ylabel("throughput (samples/s, global)")
        ax.set_ylim(bottom=0)
    ax.set_title(_title(studies, "throughput vs world size"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    return _finish(fig, path, INTERVAL_NOTE)


def efficiency(studies: Sequence[StudyStats], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    top = 110.0
    for i, st in enumerate(studies):
        sizes = [s for s in st.sizes if s.efficiency]
        if not sizes:
            continue
        spreads = [s.efficiency for s in sizes]
        yerr = _interval_yerr(sizes, "efficiency", spreads, 100)
        top = max(top, 100 * max(s.high for s in spreads) + 10, max((100 * s.median + e for s, e in
                                                                  zip(spreads, yerr[1])), default=0) + 10 if yerr else 0)
        formula = "T(b)·b / (N·T(N))" if st.kind == "strong" else "T(b) / T(N)"
        ax.errorbar([s.world_size for s in sizes], [100 * s.median for s in spreads], yerr=yerr,
                    color=_color(i), marker="o", capsize=4, label=f"{st.label}: {st.kind}, {formula}")
    ax.axhline(100, color="black", linestyle="--", alpha=0.6, label="ideal (100%)")
    _log2_axis(ax, _sizes(studies))
    ax.set_ylim(0, top)
    ax.set_ylabel("parallel efficiency (%)")
    ax.set_title(_title(studies, "scaling efficiency vs world size"))
    ax.legend(fontsize=8, loc="best")
    return _finish(fig, path, INTERVAL_NOTE + "\nb = smallest world size, T(N) = median step time")


def _bar_positions(sizes: Sequence[int]) -> tuple[list[float], float]:
    xs = [math.log2(n) for n in sizes]
    gaps = [b - a for a, b in zip(xs, xs[1:])]
    return xs, min([0.6, *(0.8 * g for g in gaps)])


def _bar_axis(ax: Axes, sizes: Sequence[int]) -> None:
    xs, width = _bar_positions(sizes)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(n) for n in sizes])
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    ax.set_xlabel("world size (processes, log2 scale)")
    ax.grid(True, axis="y", alpha=0.3)


def _grid(count: int) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(count, 1, figsize=(9, 1.2 + 3.6 * count), squeeze=False)
    return fig, [row[0] for row in axes]


def breakdown(studies: Sequence[StudyStats], path: Path) -> Path:
    fig, axes = _grid(len(studies))
    for ax, st in zip(axes, studies):
        sizes = [s for s in st.sizes if s.parts_s]
        if not sizes:
            ax.set_title(f"{st.label}: no completed run with a step breakdown")
            continue
        xs, width = _bar_positions([s.world_size for s in sizes])
        bottom = [0.0] * len(sizes)
        tallest = max(s.step_s.high for s in sizes) * 1e3
        for name in SHARES:
            heights = [s.parts_s[name] * 1e3 for s in sizes]
            ax.bar(xs, heights, width, bottom=bottom, color=SHARE_COLORS[name], label=SHARE_LABELS[name])
            for x, h, b, s in zip(xs, heights, bottom, sizes):
                if h >= 0.07 * tallest:
                    ax.text(x, b + h / 2, f"{100 * s.shares[name]:.0f}%", ha="center", va="center",
                            fontsize=8, color="white")
            bottom = [b + h for b, h in zip(bottom, heights)]
        steps = [s.step_s for s in sizes]
        if _yerr(steps) is not None:
            ax.errorbar(xs, [s.median * 1e3 for s in steps], yerr=_yerr(steps, 1e3), fmt="none", ecolor="black",
                        capsize=4, label="step time min-max")
        _bar_axis(ax, [s.world_size for s in sizes])
        ax.set_ylim(0, tallest * 1.15)
        ax.set_ylabel("time per step (ms)")
        ax.set_title(f"{st.label} ({st.kind} scaling): where the median step goes")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(fig, path, "bar = median step split by the median shares; labels: share of the step; "
                              "error bars: min-max step time over repeats")


def _memory_unit(values: Sequence[float | None]) -> tuple[str, float]:
    largest = max((v or 0 for v in values), default=0)
    if largest >= 2**30:
        return "GiB", 2**30
    return ("MiB", 2**20) if largest >= 2**20 else ("KiB", 2**10)


def memory(studies: Sequence[StudyStats], path: Path) -> Path:
    """Left: the bytes each rank holds by category; right: what the process measured."""
    accounted = [s.memory_bytes.get(k) for st in studies for s in st.sizes for k in MEMORY_CATEGORIES]
    measured = [s.memory_bytes.get(k) for st in studies for s in st.sizes for k in ("peak", "rss_peak")]
    (left_unit, left_scale), (right_unit, right_scale) = _memory_unit(
        [sum(s.memory_bytes.get(k) or 0 for k in MEMORY_CATEGORIES) for st in studies for s in st.sizes]
    ), _memory_unit(measured)
    fig, grid = plt.subplots(len(studies), 2, figsize=(10, 1.6 + 3.8 * len(studies)), squeeze=False)
    for (left, right), st in zip(grid, studies):
        sizes = st.sizes
        if not sizes or not any(accounted):
            left.set_title(f"{st.label}: no memory records")
            continue
        ws = [s.world_size for s in sizes]
        xs, width = _bar_positions(ws)
        bottom = [0.0] * len(sizes)
        for name in MEMORY_CATEGORIES:
            heights = [(s.memory_bytes.get(name) or 0) / left_scale for s in sizes]
            if not any(heights):
                continue
            left.bar(xs, heights, width, bottom=bottom, color=MEMORY_COLORS[name], label=MEMORY_LABELS[name])
            bottom = [b + h for b, h in zip(bottom, heights)]
        for x, total in zip(xs, bottom):
            left.annotate(f"{total:.1f}", (x, total), textcoords="offset points", xytext=(0, 3), ha="center",
                          fontsize=8)
        _bar_axis(left, ws)
        left.set_ylim(0, max([*bottom, 1e-9]) * 1.18)
        left.set_ylabel(f"bytes per rank ({left_unit})")
        left.set_title(f"{st.label}: held per rank, by category", fontsize=10)
        left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
        half = width / 2
        for offset, key, color, label in ((-half / 2, "peak", "#333333", "peak (CUDA: max allocated; CPU: RSS growth)"),
                                          (half / 2, "rss_peak", "#AAAAAA", "resident set size peak (whole process)")):
            heights = [(s.memory_bytes.get(key) or 0) / right_scale for s in sizes]
            if any(heights):
                right.bar([x + offset for x in xs], heights, half, color=color, label=label)
        _bar_axis(right, ws)
        right.set_ylabel(f"bytes per rank ({right_unit})")
        right.set_title(f"{st.label}: measured by the process", fontsize=10)
        right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    return _finish(fig, path, "median over repeats of the largest rank's bytes; left: the categories the "
                              "instruments account for (numbers: their total); right: what the process measured")


def communication(studies: Sequence[StudyStats], path: Path) -> Path:
    """Busy (all-reduce in flight) beside exposed (on the critical path), per world size."""
    fig, axes = _grid(len(studies))
    per_study = [max((s.comm_s.high for s in st.sizes if s.comm_s), default=0.0) * 1e3 for st in studies]
    shared = not _spans_decades(per_study)  # one scale makes similar studies comparable at a glance
    for ax, st in zip(axes, studies):
        sizes = [s for s in st.sizes if s.comm_s and s.comm_exposed_s]
        if not sizes:
            ax.set_title(f"{st.label}: no communication records")
            continue
        ws = [s.world_size for s in sizes]
        xs, width = _bar_positions(ws)
        half = width / 2
        busy = [s.comm_s for s in sizes]
        exposed = [s.comm_exposed_s for s in sizes]
        ddp = st.strategy == "ddp"
        names = "all-reduce" if ddp else collectives(st.strategy)
        ax.bar([x - half / 2 for x in xs], [s.median * 1e3 for s in busy], half, yerr=_yerr(busy, 1e3), capsize=3,
               color="#9DB4D6", label=f"busy: {names} in flight (overlapped part included)")
        ax.bar([x + half / 2 for x in xs], [s.median * 1e3 for s in exposed], half, yerr=_yerr(exposed, 1e3),
               capsize=3, color=SHARE_COLORS["comm_exposed"],
               label="exposed: on the critical path after backward" if ddp
               else "exposed: the training thread waited for it")
        for x, s in zip(xs, sizes):
            if s.overlap is not None:
                ax.annotate(f"{100 * s.overlap:.0f}% hidden", (x, s.comm_s.high * 1e3), textcoords="offset points",
                            xytext=(0, 4), ha="center", fontsize=8)
        _bar_axis(ax, ws)
        ax.set_ylim(0, max(max(per_study) if shared else per_study[studies.index(st)], 1e-6) * 1.2)
        ax.set_ylabel("gradient all-reduce per step (ms)" if ddp else "communication per step (ms)")
        ax.set_title(f"{st.label} ({st.kind} scaling): communication, busy vs exposed")
        ax.legend(fontsize=8, loc="upper left")
    return _finish(fig, path, "bars: median over repeats; error bars: min-max over repeats; "
                              "hidden = 1 - exposed/busy (overlapped with compute)")


def model_state(studies: Sequence[StudyStats], path: Path) -> Path:
    """Model state per rank (parameters, gradients, optimizer state) by strategy against world size: measured
    (memory.max.model_state) and predicted (run.json memory_model), the DDP replica's for reference."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    values = [v for st in studies for s in st.sizes
              for v in (s.model_state_bytes, s.predicted_model_state_bytes, s.predicted_ddp_model_state_bytes)]
    unit, scale = _memory_unit(values)
    for i, st in enumerate(studies):
        measured = [(s.world_size, s.model_state_bytes) for s in st.sizes if s.model_state_bytes is not None]
        predicted = [(s.world_size, s.predicted_model_state_bytes) for s in st.sizes
                     if s.predicted_model_state_bytes is not None]
        name = st.label if st.strategy in st.label else f"{st.label} ({st.strategy})"
        if measured:
            ax.plot([n for n, _ in measured], [v / scale for _, v in measured], color=_color(i), marker="o",
                    label=f"{name}: measured")
        if predicted:
            ax.plot([n for n, _ in predicted], [v / scale for _, v in predicted], color=_color(i), marker="x",
                    markersize=9, linestyle="--", alpha=0.8, label=f"{name}: predicted (memory_model)")
    if not any(st.strategy == "ddp" for st in studies):
        replica = sorted({(s.world_size, s.predicted_ddp_model_state_bytes) for st in studies for s in st.sizes
                          if s.predicted_ddp_model_state_bytes is not None})
        if replica:
            ax.plot([n for n, _ in replica], [v / scale for _, v in replica], color="#888888", linestyle=":",
                    label="DDP replica (predicted)")
    _log2_axis(ax, _sizes(studies))
    ax.set_ylim(0, max([v / scale for v in values if v is not None] + [1e-9]) * 1.15)
    ax.set_ylabel(f"model state per rank ({unit})")
    ax.set_title(_title(studies, "model state per rank by strategy"))
    ax.legend(fontsize=8, loc="best")
    return _finish(fig, path, "model state = parameters + gradients + optimizer state of the largest rank, median "
                              "over repeats\nsolid: measured (memory.max.model_state); dashed: run.json memory_model; "
                              "at 1 process every strategy trains unwrapped")


WATERFALL_TOTAL = "#4C72B0"
WATERFALL_LOSS = "#C44E52"
WATERFALL_GAIN = "#55A868"
WATERFALL_UNSPLIT = "#BBBBBB"
WATERFALL_NOISE = "#E8B4B6"
WATERFALL_COLUMNS = 2
WATERFALL_TICKS = {"batch": "smaller\nbatch", "contention": "contention", "data": "data\nloading",
                   "other": "framework\noverhead", "interference": "interfer-\nence",
                   "comm_exposed": "exposed\nall-reduce", "comm_wait": "waiting for\nslower ranks"}


def _waterfall_bars(size: SizeWaterfall) -> list[tuple[str, float, float, str, str, Any]]:
    """(label, bottom, height, colour, text, interval) from T_ideal up to T; None terms are skipped, their sum
    shown as one hatched "not split" bar. A term within noise (its interval spans 0) is drawn pale."""
    places = ms_decimals(size.step_s)
    bars = [("ideal\nT_ideal", 0.0, size.ideal_step_s, WATERFALL_TOTAL, f"{ms(size.ideal_step_s, places)} ms",
             size.intervals.get("ideal"))]
    level = size.ideal_step_s
    steps = [(_tick(t, size), v, False, t) for t, v in size.terms_s.items() if v is not None]
    if size.unsplit_s is not None:
        steps.append(("not split\n(control\nmissing)", size.unsplit_s, True, None))
    for label, value, unsplit, term in steps:
        colour = WATERFALL_UNSPLIT if unsplit else (WATERFALL_LOSS if value >= 0 else WATERFALL_GAIN)
        noise = term is not None and size.within_noise(term)
        text = f"{'+' if value >= 0 else '−'}{ms(abs(value), places)} ms\n{size.points(value):+.1f} pts"
        if noise:
            colour, text = WATERFALL_NOISE, text + "\nwithin noise"
        bars.append((label, level, value, colour, text, size.intervals.get(term) if term else None))
        level += value
    bars.append(("measured\nT", 0.0, size.step_s, WATERFALL_TOTAL,
                 f"{ms(size.step_s, places)} ms\neff. {100 * size.efficiency:.0f}%", size.intervals.get("step")))
    return bars


def _tick(term: str, size: SizeWaterfall) -> str:
    if term == "comm_wait" and size.straggler:
        return f"waiting for\nrank {size.straggler['rank']}"
    if term == "comm_wait" and size.skew:
        return "skew: ranks\ntake turns"
    if term == "comm_exposed":
        return size.exposed_label.replace(" ", "\n", 1).replace(" and ", " and\n")
    return WATERFALL_TICKS[term]


def _draw_waterfall(ax: Axes, size: SizeWaterfall, title: str) -> None:
    bars = _waterfall_bars(size)
    xs = list(range(len(bars)))
    scale = 1e3
    highest = 0.0
    for x, (label, bottom, height, colour, text, found) in zip(xs, bars):
        hatch = "//" if colour == WATERFALL_UNSPLIT else None
        ax.bar(x, height * scale, 0.7, bottom=bottom * scale, color=colour, hatch=hatch, edgecolor="#333333",
               linewidth=0.5)
        top = max(bottom, bottom + height) * scale
        if found is not None:  # the term's interval, drawn where the bar ends
            end = (bottom + height) * scale
            low, high = bottom * scale + found.low * scale, bottom * scale + found.high * scale
            ax.errorbar([x], [end], yerr=[[max(0.0, end - low)], [max(0.0, high - end)]], fmt="none",
                        ecolor="black", capsize=3, linewidth=0.8)
            top = max(top, high)
        highest = max(highest, top)
        ax.annotate(text, (x, top), textcoords="offset points", xytext=(0, 3), ha="center", va="bottom", fontsize=7)
    for x in xs[:-1]:  # connectors: each bar starts where the previous one ended
        end = (bars[x][1] + bars[x][2]) * scale
        ax.plot([x + 0.35, x + 0.65], [end, end], color="#555555", linewidth=0.6)
    ax.set_xticks(xs)
    ax.set_xticklabels([b[0] for b in bars], fontsize=7)
    ax.set_ylim(0, highest * 1.25 if highest > 0 else 1.0)
    ax.set_ylabel("time per step (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)


def waterfall(studies: Sequence[StudyStats], path: Path) -> Path:
    """Per study and world size: from T_ideal up to the measured T, one bar per term of the lost efficiency."""
    panels = [(st, size) for st in studies if st.waterfall is not None for size in st.waterfall.shown()]
    if not panels:
        fig, ax = plt.subplots(figsize=(7.5, 3))
        reasons = "; ".join(f"{st.label}: {st.waterfall.problem or 'only the baseline completed'}"
                            for st in studies if st.waterfall is not None)
        ax.text(0.5, 0.5, f"no waterfall to draw ({reasons})", ha="center", va="center", wrap=True)
        ax.set_axis_off()
        return _finish(fig, path, None)
    columns = min(WATERFALL_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(0.6 + 7.4 * columns, 0.9 + 4.6 * rows), squeeze=False)
    for ax, (st, size) in zip([a for row in grid for a in row], panels):
        _draw_waterfall(ax, size, f"{st.label}: {procs(size.world_size)} ({st.kind} scaling), "
                                  f"{100 * size.efficiency:.0f}% efficient")
    for ax in [a for row in grid for a in row][len(panels):]:
        ax.set_axis_off()
    return _finish(fig, path, "red: time lost per step, green: time gained, pale: within noise (interval spans 0); pts = points of "
                              "efficiency (100 x term / T)\nerror bars: 95% bootstrap interval of each term, T_ideal and T; "
                              "medians over repeats; T_ideal = T(b)·b/N (strong) or T(b) (weak); hatched: not split, "
                              "a control is missing")


FIGURES = {
    "throughput.png": throughput,
    "efficiency.png": efficiency,
    "breakdown.png": breakdown,
    "memory.png": memory,
    "communication.png": communication,
    "waterfall.png": waterfall,
}


def draw_all(studies: Sequence[StudyStats], folder: Path) -> list[Path]:
    """Every figure; ``model_state.png`` where a study runs zero1 or fsdp (or studies differ in strategy)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not any(st.sizes for st in studies):
        return []
    drawn = [draw(studies, folder / name) for name, draw in FIGURES.items()]
    if any(st.strategy != "ddp" for st in studies):
        drawn.append(model_state(studies, folder / "model_state.png"))
    return drawn
