"""``plots/timeline.png``: a few measured steps per world size, ranks one above the other, from timeline.json.

Each rank is a bar along the aligned time axis, coloured by what it does (compute, exposed communication,
waiting for slower ranks, data loading, framework overhead: the colours of the other figures), with a thin strip
under it where its all-reduce or collectives are in flight (busy, the hidden part included). Beyond
``ROWS_MAX`` ranks only the fastest, median and slowest (by own time) get a bar, and a band above them shows,
at each moment, the share of all the file's ranks in each state. ``python -m scaling.report.timeline_plot
RUN_DIR OUT.png`` draws one run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from scaling.records import chrome_trace  # noqa: E402
from scaling.report.metrics import StudyStats  # noqa: E402
from scaling.report.plots import DPI, SHARE_COLORS  # noqa: E402

ROWS_MAX = 8
"""More ranks than this: the fastest, median and slowest drawn, the others summarised in a band."""
STEPS_SHOWN = 3
WAITING_COLOR = "#F0B5B7"
BUSY_COLOR = "#9DB4D6"
PHASE_STATE = {"data": "data", "forward": "compute", "backward": "compute", "optimizer": "compute", "other": "other"}
STATES = ("compute", "comm_exposed", "waiting", "data", "other")
STATE_COLORS = {**SHARE_COLORS, "waiting": WAITING_COLOR}
STATE_LABELS = {"compute": "compute", "comm_exposed": "exposed communication", "waiting": "waiting for slower ranks",
                "data": "data loading", "other": "framework overhead"}


def rank_intervals(trace: dict[str, Any], steps: Sequence[int]) -> dict[int, dict[str, list[tuple[float, float]]]]:
    """Per rank, per state (and ``busy``), the intervals [start, end] in ms of the aligned clock, for ``steps``."""
    wanted = set(steps)
    out: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for rank, events in chrome_trace.slices_by_rank(trace).items():
        by: dict[str, list[tuple[float, float]]] = {k: [] for k in (*STATES, "busy")}
        for e in events:
            if e.get("args", {}).get("step") not in wanted:
                continue
            span = (e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3)
            cat = e.get("cat")
            if cat == "phase":
                by[PHASE_STATE.get(e["name"], "other")].append(span)
            elif cat == "exposed":
                by["comm_exposed"].append(span)
            elif cat == "waiting":
                by["waiting"].append(span)
            elif cat in ("bucket", "collective"):
                by["busy"].append(span)
        out[rank] = by
    return out


def _state_grid(by: dict[str, list[tuple[float, float]]], grid: np.ndarray) -> np.ndarray:
    """The state index (into STATES, -1 for none) of one rank at each time of ``grid``; later layers win:
    phases, then exposed communication over them, then waiting over that."""
    state = np.full(grid.shape, -1)
    for name in ("compute", "data", "other", "comm_exposed", "waiting"):
        for a, b in by[name]:
            state[(grid >= a) & (grid < b)] = STATES.index(name)
    return state


def shown_ranks(trace: dict[str, Any], ranks: Sequence[int]) -> tuple[list[tuple[int, str]], bool]:
    """(rank, label) of the rows drawn, top to bottom, and whether the others are summarised."""
    own = {e["rank"]: e.get("own_s") or 0.0 for e in trace["otherData"].get("alignment", {}).get("ranks", [])}
    order = sorted(ranks, key=lambda r: (own.get(r, 0.0), r))
    if trace["otherData"].get("ranks_left_out") and len(ranks) == 3:  # the file itself kept these three
        return [(order[-1], f"rank {order[-1]}\n(slowest)"), (order[1], f"rank {order[1]}\n(median)"),
                (order[0], f"rank {order[0]}\n(fastest)")], False
    if len(ranks) <= ROWS_MAX:
        return [(r, f"rank {r}") for r in ranks], False
    picks = [(order[-1], "slowest"), (order[len(order) // 2], "median"), (order[0], "fastest")]
    return [(r, f"rank {r}\n({what})") for r, what in picks], True


def _draw_rows(ax, intervals, rows: list[tuple[int, str]]) -> None:
    for y, (rank, _) in enumerate(rows):
        by = intervals[rank]
        for name in ("compute", "data", "other", "comm_exposed", "waiting"):
            spans = [(a, b - a) for a, b in by[name]]
            if spans:
                ax.broken_barh(spans, (y - 0.3, 0.5), facecolors=STATE_COLORS[name],
                               hatch="///" if name == "waiting" else None,
                               edgecolor=SHARE_COLORS["comm_exposed"] if name == "waiting" else "none", linewidth=0)
        busy = [(a, b - a) for a, b in by["busy"]]
        if busy:
            ax.broken_barh(busy, (y + 0.24, 0.1), facecolors=BUSY_COLOR)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for _, label in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.6)


def draw_panel(fig, spec, trace: dict[str, Any], title: str) -> None:
    """One run's panel into ``spec`` (a gridspec cell): the band (when summarised) and the rank rows."""
    other = trace["otherData"]
    steps = list(other.get("steps", []))[:STEPS_SHOWN]
    intervals = rank_intervals(trace, steps)
    ranks = sorted(intervals)
    rows, summarised = shown_ranks(trace, ranks)
    world = other.get("world_size", len(ranks))
    starts = [a for by in intervals.values() for name in STATES for a, _ in by[name]]
    ends = [b for by in intervals.values() for name in STATES for _, b in by[name]]
    origin = min(starts) if starts else 0.0
    for by in intervals.values():  # time from the first step's earliest start
        for name in by:
            by[name] = [(a - origin, b - origin) for a, b in by[name]]
    span = (max(ends) - origin) if ends else 1.0
    if summarised:
        inner = spec.subgridspec(2, 1, height_ratios=[1.3, 0.55 * len(rows) + 0.3], hspace=0.08)
        band, ax = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
        grid = np.linspace(0, span, 800)
        states = np.stack([_state_grid(intervals[r], grid) for r in ranks])
        shares = [100 * (states == i).mean(axis=0) for i in range(len(STATES))]
        band.stackplot(grid, shares, colors=[STATE_COLORS[s] for s in STATES], linewidth=0)
        band.set_xlim(0, span)
        band.set_ylim(0, 100)
        band.set_ylabel(f"% of {len(ranks)}\nranks", fontsize=8)
        band.tick_params(labelbottom=False, labelsize=7)
        band.set_title(title, fontsize=9, loc="left")
        band.grid(True, axis="x", alpha=0.3)
    else:
        ax = fig.add_subplot(spec)
        ax.set_title(title, fontsize=9, loc="left")
    _draw_rows(ax, intervals, rows)
    first_rank_slices = chrome_trace.slices_by_rank(trace)[rows[0][0]]
    for step in steps:  # step boundaries of the first row's rank
        begin = [e["ts"] / 1e3 - origin for e in first_rank_slices
                 if e.get("cat") == "step" and e["args"].get("step") == step]
        for x in begin:
            ax.axvline(x, color="#333333", linewidth=0.6, linestyle=":")
            ax.annotate(f"step {step}", (x, -0.6), xytext=(2, -1), textcoords="offset points", fontsize=7,
                        va="top", color="#333333")
    ax.set_xlim(0, span)
    ax.set_xlabel("time (ms, clocks aligned across ranks)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    if other.get("ranks_left_out"):
        ax.set_xlabel(f"time (ms, clocks aligned across ranks); timeline.json kept {len(ranks)} of {world} ranks "
                      "(size bound)", fontsize=8)


def _panel_title(label: str, trace: dict[str, Any], run_id: str, summarised: bool) -> str:
    other = trace["otherData"]
    world = other.get("world_size", 1)
    steps = list(other.get("steps", []))[:STEPS_SHOWN]
    text = f"{label}: {world} process{'es' if world != 1 else ''}, steps {steps[0]}-{steps[-1]} ({run_id})" if steps \
        else f"{label}: {world} processes"
    if summarised:
        text += f"; band: share of all {len(other.get('ranks_kept', []))} ranks in each state"
    return text


def draw(panels: Sequence[tuple[str, dict[str, Any], str]], path: Path) -> Path:
    """``panels``: (label, trace, run id) per world size, drawn top to bottom."""
    heights = []
    for _, trace, _ in panels:
        ranks = trace["otherData"].get("ranks_kept", [])
        summarised = len(ranks) > ROWS_MAX
        heights.append((1.3 + 0.55 * 3 + 0.3 if summarised else 0.55 * max(1, len(ranks)) + 0.3) + 0.9)
    fig = plt.figure(figsize=(11, 0.8 + sum(heights)))
    outer = fig.add_gridspec(len(panels), 1, height_ratios=heights, hspace=0.4)
    for i, (label, trace, run_id) in enumerate(panels):
        summarised = len(trace["otherData"].get("ranks_kept", [])) > ROWS_MAX
        draw_panel(fig, outer[i], trace, _panel_title(label, trace, run_id, summarised))
    handles = [Patch(facecolor=STATE_COLORS[s], label=STATE_LABELS[s], hatch="///" if s == "waiting" else None,
                     edgecolor=SHARE_COLORS["comm_exposed"] if s == "waiting" else "none") for s in STATES]
    handles.append(Patch(facecolor=BUSY_COLOR, label="all-reduce / collectives in flight (thin strip)"))
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.text(0.01, 0.005, "from each run's timeline.json (first measured steps; warm-up, control and profiled steps "
                          "left out); waiting: the step's comm_wait_s, from the start of its longest exposed slice", fontsize=7,
             color="#555555")
    fig.subplots_adjust(left=0.09, right=0.99, top=1 - 0.75 / fig.get_figheight(), bottom=0.5 / fig.get_figheight())
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def study_panels(studies: Sequence[StudyStats]) -> list[tuple[str, dict[str, Any], str]]:
    """Per study and world size, the trace of its first completed run that has one."""
    panels = []
    for st in studies:
        chosen: dict[int, Any] = {}
        for run in sorted(st.records.runs, key=lambda r: (r.world_size, r.repeat or 0)):
            if run.completed and run.world_size not in chosen:
                trace = chrome_trace.read(run.folder / chrome_trace.TIMELINE_JSON)
                if trace is not None and chrome_trace.slices_by_rank(trace):
                    chosen[run.world_size] = (st.label, trace, run.run_id)
        panels += [chosen[n] for n in sorted(chosen)]
    return panels


def draw_study(studies: Sequence[StudyStats], path: Path) -> Path | None:
    panels = study_panels(studies)
    return draw(panels, path) if panels else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m scaling.report.timeline_plot RUN_DIR OUT.png", file=sys.stderr)
        return 2
    trace = chrome_trace.read(Path(args[0]) / chrome_trace.TIMELINE_JSON)
    if trace is None:
        print(f"{args[0]}: no readable {chrome_trace.TIMELINE_JSON}", file=sys.stderr)
        return 1
    draw([(Path(args[0]).parent.name, trace, Path(args[0]).name)], Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
