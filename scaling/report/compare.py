"""``python -m scaling.report NEW --against REF [--fail-on METRIC:PCT ...]``: what changed, beyond the noise.

NEW and REF are each a study folder, a train sweep folder (``-m``) or one run folder. Their points are
matched by world size (studies, runs) or by combination (sweeps); a point in one only, or one whose batch
differs, is one line and is not compared. For every matched point and metric the change is
``NEW / REF - 1`` with its bootstrap interval (scaling.report.intervals: both sides drawn independently,
steps within runs and repeats across runs), and a verdict:

- ``regressed`` / ``improved``: the change is at least the threshold (``MIN_CHANGE``, or the metric's own
  from ``--fail-on``), its interval excludes zero, *and*, where both sides have two runs or more, NEW's
  median differs from REF's by more than the combined spread of the runs, on a log scale:
  ``|ln(NEW / REF)| > ln(max / min)`` of NEW's run values plus that of REF's (a ratio, so that step time
  and throughput, one the reciprocal of the other, get the same verdict);
- ``within noise`` otherwise: a change the noise could make, or one too small to act on.

Why the spread rule: a bootstrap over a handful of runs cannot see how much the next run may differ, and
runs on a shared machine differ by more than their steps do (tests/test_noise.py: median steps of 6 to
19 ms for one job). For runs drawn alike, the chance that the log medians of two sides differ by more than the
sum of their ranges is about 13 % with 2 runs a side, 1.4 % with 3 and 0.1 % with 4 (simulated for normal,
log-normal and Student-t(3) run values alike), so a verdict from 2 runs a side is marked as weak. With one
run a side only the step-to-step noise is known, and the comparison says so.

Then which part of the step moved (compute, exposed transfer, waiting for slower ranks, data loading,
framework overhead: their means per step, which add up to the mean step), each with its interval.

``--fail-on step_s:5%`` (repeatable) makes the exit status 1 when that metric regressed by more than 5 % at
some point, beyond the noise; 2 stays for usage errors; 0 otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scaling.report import intervals
from scaling.report import sweep_report
from scaling.report.intervals import Interval
from scaling.report.study_folder import RunRecord, load_study, read_run

MIN_CHANGE = 0.05
"""The smallest relative change called a regression or an improvement (5 %), unless ``--fail-on`` sets one."""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    lower_is_better: bool
    scale: float
    unit: str


METRICS = {m.key: m for m in (
    Metric("step_s", "median step", True, 1e3, " ms"),
    Metric("samples_per_s", "throughput", False, 1.0, " samples/s"),
    Metric("speedup", "speedup", False, 1.0, "x"),
    Metric("efficiency", "efficiency", False, 100.0, "%"),
    Metric("busbw_GBps", "bus bandwidth", False, 1.0, " GB/s"),
)}
"""What ``--fail-on`` may name."""
PARTS = {"compute": "compute", "transfer": "exposed transfer", "wait": "waiting for slower ranks",
         "data": "data loading", "other": "framework overhead"}
"""The parts of a step (means per step: they add up to the mean step)."""


class UsageError(ValueError):
    """A command-line mistake: exit status 2."""


def parse_fail_on(specs: Sequence[str]) -> dict[str, float]:
    """``["step_s:5%"]`` -> ``{"step_s": 0.05}``; a mistake is a UsageError naming the spec and what is valid."""
    out = {}
    for spec in specs:
        key, _, pct = spec.partition(":")
        if key not in METRICS:
            raise UsageError(f"--fail-on {spec!r}: metric {key!r} is not one of {', '.join(METRICS)}")
        try:
            value = float(pct.strip().removesuffix("%"))
        except ValueError:
            raise UsageError(f"--fail-on {spec!r}: expected METRIC:PCT, e.g. step_s:5%") from None
        if value < 0:
            raise UsageError(f"--fail-on {spec!r}: the threshold must be >= 0")
        out[key] = value / 100
    return out


# -- the two sides ----------------------------------------------------------------------------


@dataclass
class Point:
    key: str
    """``2 processes``, or a sweep's combination."""
    runs: list[RunRecord]
    world_size: int
    batch_per_rank: int | None
    global_batch: int | None
    speedup: tuple[np.ndarray, float] | None = None
    efficiency: tuple[np.ndarray, float] | None = None
    """(draws, value) from the study's baseline, where the side is a strong or weak study."""


@dataclass
class Side:
    folder: Path
    what: str
    """study | run | sweep"""
    points: dict[str, Point] = field(default_factory=dict)


def procs(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _point(key: str, runs: list[RunRecord]) -> Point:
    first = runs[0]
    return Point(key, runs, first.world_size, first.batch_per_rank, first.global_batch)


def load_side(folder: Path) -> Side:
    folder = Path(folder)
    if (folder / "run.json").exists():
        run, problem = read_run(folder.parent.name, folder)
        if run is None:
            raise UsageError(problem or f"{folder}: unreadable run.json")
        side = Side(folder, "run")
        if run.completed:
            side.points[procs(run.world_size)] = _point(procs(run.world_size), [run])
        return side
    if sweep_report.is_sweep(folder) and sweep_report.command(folder) == "train":
        side = Side(folder, "sweep")
        for p in sweep_report.load(folder).points:
            if p.completed:
                side.points[p.combination] = _point(p.combination, [p.run])
        return side
    records = load_study(folder)
    side = Side(folder, "study")
    done = [r for r in records.runs if r.completed]
    for n in sorted({r.world_size for r in done}):
        side.points[procs(n)] = _point(procs(n), [r for r in done if r.world_size == n])
    _add_scaling(side, records.kind)
    return side


def _add_scaling(side: Side, kind: str) -> None:
    """Speedup and efficiency of each point against the study's baseline, drawn as the step times are."""
    if kind not in ("strong", "weak") or len(side.points) < 2:
        return
    base = min(side.points.values(), key=lambda p: p.world_size)
    t_base = _step(base)
    if t_base is None:
        return
    for point in side.points.values():
        t = _step(point)
        if t is None:
            continue
        ratio = (t_base[0] / t[0], t_base[1] / t[1])
        n, b = point.world_size, base.world_size
        if kind == "strong":
            point.speedup = ratio
            point.efficiency = (ratio[0] * b / n, ratio[1] * b / n)
        else:
            point.efficiency = ratio
            point.speedup = (ratio[0] * n / b, ratio[1] * n / b)


def _step(point: Point) -> tuple[np.ndarray, float] | None:
    draws = intervals.point_draws(point.runs, "step_s", intervals.median_of("step_s"))
    value = statistics.median(r.summary["step_s"] for r in point.runs)
    return None if draws is None else (draws, value)


# -- the comparison ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    metric: Metric
    new: float
    ref: float
    relative: Interval
    """NEW / REF - 1 with its interval."""
    verdict: str
    """regressed | improved | within noise"""
    threshold: float
    spread: float | None = None
    """ln(max / min) of NEW's run values plus that of REF's (None with fewer than 2 runs on a side)."""

    @property
    def regressed(self) -> bool:
        return self.verdict == "regressed"


@dataclass(frozen=True)
class PartChange:
    part: str
    delta_s: Interval
    """NEW - REF, seconds per step."""


@dataclass
class PointComparison:
    key: str
    changes: list[Change] = field(default_factory=list)
    parts: list[PartChange] = field(default_factory=list)
    step_delta_s: Interval | None = None
    ref_step_s: float | None = None
    """REF's mean step: a part moved when its change is at least MIN_CHANGE of it, beyond the noise."""
    note: str | None = None
    """Why the point is not compared (in one side only, batch mismatch)."""
    runs: tuple[int, int] = (0, 0)


def judge(relative: Interval, metric: Metric, threshold: float, spread: float | None = None) -> str:
    """``regressed`` or ``improved`` only when the change is at least the threshold and beyond the noise:
    its interval excludes 0 and ``|ln(NEW / REF)|`` exceeds the runs' combined spread (``_spread``)."""
    if abs(relative.value) < threshold or relative.spans(0.0):
        return "within noise"
    if spread is not None and abs(math.log1p(relative.value)) <= spread:
        return "within noise"
    worse = relative.value > 0 if metric.lower_is_better else relative.value < 0
    return "regressed" if worse else "improved"


def _run_values(point: Point, key: str) -> list[float]:
    """Each run's own value of ``key`` (none for speedup and efficiency, which are the point's)."""
    if key in ("speedup", "efficiency"):
        return []
    if key == "busbw_GBps":
        return [v for v in (r.busbw_GBps() for r in point.runs) if v is not None]
    return [v for v in (r.number(key) for r in point.runs) if v is not None]


def _metric_draws(point: Point, key: str) -> tuple[np.ndarray, float] | None:
    if key in ("speedup", "efficiency"):
        return getattr(point, key)
    draws = intervals.point_draws(point.runs, key, intervals.median_of(key))
    values = _run_values(point, key)
    if draws is None or not values:
        return None
    return draws, statistics.median(values)


def _spread(new: Point, ref: Point, key: str) -> float | None:
    """ln(max / min) of NEW's run values plus that of REF's; None unless both sides have 2 positive runs or more."""
    a, b = _run_values(new, key), _run_values(ref, key)
    if len(a) < 2 or len(b) < 2 or min(a + b) <= 0:
        return None
    return math.log(max(a) / min(a)) + math.log(max(b) / min(b))


def _part_column(steps: Sequence[dict[str, Any]], part: str) -> np.ndarray | None:
    def col(key: str) -> np.ndarray | None:
        values = [s.get(key) for s in steps]
        if any(not isinstance(v, (int, float)) for v in values):
            return None
        return np.asarray(values, dtype=float)

    exposed, wait = col("comm_exposed_s"), col("comm_wait_s")
    if part == "transfer":
        return None if exposed is None else exposed - (wait if wait is not None else 0.0)
    if part == "wait":
        return wait
    if part == "step":
        return col("step_s")
    return col(f"{part}_s")


def _mean_part(part: str) -> intervals.Statistic:
    def stat(steps: Sequence[dict[str, Any]], idx: np.ndarray) -> np.ndarray | None:
        column = _part_column(steps, part)
        return None if column is None else column[idx].mean(axis=1)
    return stat


def _mean_value(point: Point, part: str) -> float | None:
    values = [c.mean() for c in (_part_column(r.steps, part) for r in point.runs) if c is not None and c.size]
    return statistics.median(values) if values else None


def compare_point(new: Point, ref: Point, thresholds: dict[str, float]) -> PointComparison:
    out = PointComparison(new.key, runs=(len(new.runs), len(ref.runs)))
    if (new.batch_per_rank, new.global_batch) != (ref.batch_per_rank, ref.global_batch):
        out.note = (f"mismatched: batch {new.batch_per_rank} per rank, {new.global_batch} global in NEW against "
                    f"{ref.batch_per_rank} and {ref.global_batch} in REF; not compared")
        return out
    for key, metric in METRICS.items():
        a, b = _metric_draws(new, key), _metric_draws(ref, key)
        if a is None or b is None or b[1] == 0:
            continue
        relative = intervals.of_draws(a[1] / b[1] - 1, a[0] / b[0] - 1)
        threshold = thresholds.get(key, MIN_CHANGE)
        spread = _spread(new, ref, key)
        verdict = judge(relative, metric, threshold, spread)
        out.changes.append(Change(metric, a[1], b[1], relative, verdict, threshold, spread))
    total_new, total_ref = [], []
    for part in PARTS:
        a = intervals.point_draws(new.runs, f"part:{part}", _mean_part(part))
        b = intervals.point_draws(ref.runs, f"part:{part}", _mean_part(part))
        va, vb = _mean_value(new, part), _mean_value(ref, part)
        if a is None or b is None or va is None or vb is None:
            continue
        out.parts.append(PartChange(part, intervals.of_draws(va - vb, a - b)))
        total_new.append(a)
        total_ref.append(b)
    if out.parts:
        delta = sum(p.delta_s.value for p in out.parts)
        out.step_delta_s = intervals.of_draws(delta, sum(total_new) - sum(total_ref))
        out.ref_step_s = _mean_value(ref, "step")
    return out


@dataclass
class Comparison:
    new: Side
    ref: Side
    points: list[PointComparison]
    thresholds: dict[str, float]

    def failures(self) -> list[tuple[str, Change]]:
        """(point, change) for each ``--fail-on`` metric that regressed beyond its threshold and the noise."""
        return [(p.key, c) for p in self.points for c in p.changes
                if c.metric.key in self.thresholds and c.regressed]


def compare(new_folder: Path, ref_folder: Path, thresholds: dict[str, float] | None = None) -> Comparison:
    thresholds = thresholds or {}
    new, ref = load_side(new_folder), load_side(ref_folder)
    points = []
    for key in sorted(set(new.points) | set(ref.points), key=_order):
        if key not in ref.points:
            points.append(PointComparison(key, note=f"only in NEW: REF has no completed run at {key}"))
        elif key not in new.points:
            points.append(PointComparison(key, note=f"only in REF: NEW has no completed run at {key}"))
        else:
            points.append(compare_point(new.points[key], ref.points[key], thresholds))
    return Comparison(new, ref, points, thresholds)


def _order(key: str) -> tuple[int, Any]:
    head = key.split(" ")[0]
    return (0, int(head)) if head.isdigit() else (1, key)


# -- words ------------------------------------------------------------------------------------


def _value(metric: Metric, value: float) -> str:
    v = value * metric.scale
    places = 2 if abs(v) < 100 else 1
    return f"{v:.{places}f}{metric.unit}"


def change_line(change: Change) -> str:
    r = change.relative
    return (f"{change.metric.key:<14} {_value(change.metric, change.ref):>16} -> {_value(change.metric, change.new):<16} "
            f"{100 * r.value:+6.1f}% [{100 * r.low:+.1f}, {100 * r.high:+.1f}]  {change.verdict}")


def moved_line(point: PointComparison) -> str | None:
    """Which part of the step moved: the parts beyond the noise, largest change first."""
    if not point.parts or point.step_delta_s is None:
        return None
    least = MIN_CHANGE * (point.ref_step_s or 0.0)
    moved = sorted((p for p in point.parts if not p.delta_s.spans(0.0) and abs(p.delta_s.value) >= least),
                   key=lambda p: -abs(p.delta_s.value))
    total = point.step_delta_s
    head = f"mean step {1e3 * total.value:+.2f} ms [{1e3 * total.low:+.2f}, {1e3 * total.high:+.2f}]"
    if not moved:
        return f"{head}; no part of the step moved by {100 * MIN_CHANGE:g}% of the step beyond the noise"
    parts = ", ".join(f"{PARTS[p.part]} {1e3 * p.delta_s.value:+.2f} ms [{1e3 * p.delta_s.low:+.2f}, "
                      f"{1e3 * p.delta_s.high:+.2f}]" for p in moved)
    return f"{head}; moved by {100 * MIN_CHANGE:g}% of the step or more, beyond the noise: {parts}"


def _runs_caveat(runs: tuple[int, int]) -> str:
    fewest = min(runs)
    if fewest == 1:
        return "; one run on a side: step-to-step noise only, the run-to-run noise is not known"
    if fewest == 2:
        return "; 2 runs on a side: about 1 in 8 unchanged pairs would differ beyond their spread, 3 or more are surer"
    return ""


def text(comparison: Comparison) -> str:
    thresholds = ", ".join(f"{k} {100 * v:g}%" for k, v in comparison.thresholds.items())
    lines = [f"{comparison.new.folder} against {comparison.ref.folder}: change = NEW / REF - 1, "
             f"{100 * intervals.CONFIDENCE:.0f}% bootstrap interval (steps within runs, repeats across runs); "
             f"regressed or improved = at least {100 * MIN_CHANGE:g}%"
             + (f" ({thresholds} for --fail-on)" if thresholds else "")
             + ", an interval that excludes 0 and, with 2 runs a side or more, a change beyond the runs' spread"]
    for point in comparison.points:
        if point.note:
            lines.append(f"  {point.key}: {point.note}")
            continue
        runs = f"{point.runs[0]} vs {point.runs[1]} run(s)"
        lines.append(f"  {point.key} ({runs}{_runs_caveat(point.runs)})")
        lines += [f"    {change_line(c)}" for c in point.changes]
        moved = moved_line(point)
        if moved:
            lines.append(f"    {moved}")
    for key, change in comparison.failures():
        lines.append(f"FAIL {change.metric.key} at {key}: {100 * change.relative.value:+.1f}% "
                     f"[{100 * change.relative.low:+.1f}, {100 * change.relative.high:+.1f}], worse than the "
                     f"{100 * change.threshold:g}% allowed and beyond the noise")
    if comparison.thresholds and not comparison.failures():
        lines.append("PASS: no --fail-on metric regressed beyond its threshold and the noise")
    return "\n".join(lines)


def main(new: Path, ref: Path, fail_on: Sequence[str], emit: Callable[[str], None] = print) -> int:
    thresholds = parse_fail_on(fail_on)
    for folder in (new, ref):
        if not Path(folder).is_dir():
            raise UsageError(f"{folder} is not a directory (a study, a sweep or a run folder)")
    comparison = compare(new, ref, thresholds)
    if not any(p.changes for p in comparison.points) and not any(p.note for p in comparison.points):
        raise UsageError(f"no completed run in {new} or {ref}: nothing to compare")
    emit(text(comparison))
    return 1 if comparison.failures() else 0
