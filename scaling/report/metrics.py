"""Scaling numbers from the records (docs/contract.md, "Scaling").

Baseline ``b`` = the smallest world size with a completed run; ``T(N)`` = the
median over repeats of each run's median ``step_s``.

- strong: ``speedup = T(b)/T(N)``, ``efficiency = speedup * b / N``
- weak:   ``efficiency = T(b)/T(N)``, ``scaled_speedup = efficiency * N / b``

Per run, the same formulas with that run's own step time in place of ``T(N)``;
the spread over repeats (min and max of the per-run values) gives the error bars.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scaling.records.schema import KIND_SUFFIXES, MEMORY_CATEGORIES, SHARES, verdict
from scaling.report.study_folder import RunRecord, StudyRecords, common_straggler, kinds_of
from scaling.report import intervals
from scaling.report.intervals import Interval
from scaling.report.waterfall import StudyWaterfall, study_waterfall



@dataclass(frozen=True)
class Spread:
    """Median over repeats with the smallest and largest value."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        values = [float(v) for v in values if v is not None]
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))

    @property
    def relative_range(self) -> float:
        return (self.high - self.low) / self.median if self.median else 0.0


@dataclass
class SizeStats:
    """Everything the report shows for one world size of one study."""

    world_size: int
    completed: int
    not_completed: int
    """Repeats at this size with no completed run (superseded failed attempts are not counted)."""
    batch_per_rank: int | None
    global_batch: int | None
    nodes: int | None
    step_s: Spread
    samples_per_s: Spread
    speedup: Spread
    """strong: speedup; weak: scaled speedup."""
    efficiency: Spread
    shares: dict[str, float]
    """Median share of the step for each of SHARES, normalised to sum to 1."""
    parts_s: dict[str, float]
    """Each share times the median step: seconds per step that stack up to T(N)."""
    comm_s: Spread | None
    comm_exposed_s: Spread | None
    overlap: float | None
    busbw_GBps: float | None
    """Of the bytes really sent (comm_wire_bytes): a compressing hook's is not overstated."""
    memory_bytes: dict[str, float | None]
    """Median over repeats of the max over ranks, per category, plus peak and rss_peak."""
    bound: str | None
    """compute | communication | straggler | data: the runs' own verdict (the most common over repeats)."""
    comm_wait_frac: float | None = None
    """Share of the time spent waiting for slower ranks (part of comm_exposed); None without a peer."""
    straggler: dict[str, Any] | None = None
    """The rank the others waited for and the phase where it lost its time (run.json summary.straggler)."""
    waiting: dict[str, Any] | None = None
    """The median run's run.json summary.waiting: straggler or skew, last arrivals per rank, the test's figures."""
    arithmetic_frac: float | None = None
    """Median over repeats of the op profile's share of operator time in arithmetic-bound operators."""
    memory_frac: float | None = None
    """The same for memory-bound operators (None without an op profile)."""
    model_state_bytes: float | None = None
    """Median over repeats of memory.max.model_state (parameters, gradients, optimizer state of a rank)."""
    predicted_model_state_bytes: float | None = None
    """The same from run.json memory_model (its prediction for the strategy that ran)."""
    predicted_ddp_model_state_bytes: float | None = None
    """memory_model.ddp_model_state: what a DDP replica of the same model would hold per rank."""
    intervals: dict[str, Interval] = field(default_factory=dict)
    """95% bootstrap intervals (scaling.report.intervals) of ``step_s``, ``samples_per_s``, ``busbw_GBps``,
    ``speedup``, ``efficiency`` and each share ``<part>_frac``; absent where the records lack the steps."""
    comm_kinds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per kind of collective (comm_<kind>_*): median over repeats of its busy ``s``, ``exposed_s`` and
    ``bytes`` per step; only the kinds the runs recorded."""


@dataclass
class StudyStats:
    records: StudyRecords
    baseline: int | None
    sizes: list[SizeStats] = field(default_factory=list)
    run_speedup: dict[str, float] = field(default_factory=dict)
    run_efficiency: dict[str, float] = field(default_factory=dict)
    waterfall: StudyWaterfall | None = None
    """Why efficiency is lost, per world size."""

    @property
    def name(self) -> str:
        return self.records.name

    @property
    def kind(self) -> str:
        return self.records.kind

    @property
    def strategy(self) -> str:
        return self.records.strategy

    label: str = ""
    """How figures and tables name the study (its name, and its strategy where studies differ in it)."""

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    def size(self, world_size: int) -> SizeStats | None:
        return next((s for s in self.sizes if s.world_size == world_size), None)


def scaling_pair(kind: str, t_base: float, t_run: float, base: int, world_size: int) -> tuple[float, float] | None:
    """(speedup, efficiency) by the definitions of docs/contract.md; the speedup of a weak study is its scaled speedup."""
    if t_run <= 0 or t_base <= 0:
        return None
    if kind == "strong":
        speedup = t_base / t_run
        return speedup, speedup * base / world_size
    if kind == "weak":
        efficiency = t_base / t_run
        return efficiency * world_size / base, efficiency
    return None


def _median(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if isinstance(v, (int, float))]
    return statistics.median(present) if present else None


def _spread(runs: Sequence[RunRecord], get: Callable[[RunRecord], Any]) -> Spread | None:
    return Spread.of([v for v in (get(r) for r in runs) if isinstance(v, (int, float))])


def size_bound(runs: Sequence[RunRecord], shares: dict[str, float]) -> str | None:
    """The verdict the runs' records give (the most common over repeats; ties go to the median run's)."""
    bounds = [r.summary.get("bound") for r in runs if isinstance(r.summary.get("bound"), str)]
    if not bounds:
        return verdict({f"{name}_frac": share for name, share in shares.items()}) if shares else None
    counts = Counter(bounds).most_common()
    tied = [b for b, c in counts if c == counts[0][1]]
    if len(tied) == 1:
        return tied[0]
    return _median_run(runs).summary.get("bound") if _median_run(runs).summary.get("bound") in tied else tied[0]


def _median_run(runs: Sequence[RunRecord]) -> RunRecord:
    ordered = sorted(runs, key=lambda r: r.number("step_s") or 0.0)
    return ordered[(len(ordered) - 1) // 2]


def _shares(runs: Sequence[RunRecord]) -> dict[str, float]:
    medians = {name: _median([r.summary.get(f"{name}_frac") for r in runs]) for name in SHARES}
    if any(v is None for v in medians.values()):
        return {}
    total = sum(medians.values())  # medians of shares need not sum to 1 over repeats
    return {name: (v / total if total > 0 else 0.0) for name, v in medians.items()}


def size_stats(kind: str, world_size: int, runs: list[RunRecord], t_base: float | None, base: int | None,
               speedups: dict[str, float], efficiencies: dict[str, float]) -> SizeStats:
    done = [r for r in runs if r.completed]
    repeats_done = {r.repeat for r in done}
    step = _spread(done, lambda r: r.summary.get("step_s"))
    shares = _shares(done)
    pair = scaling_pair(kind, t_base, step.median, base, world_size) if step and t_base and base else None
    memory_keys = (*MEMORY_CATEGORIES, "peak", "rss_peak")
    return SizeStats(
        world_size=world_size,
        completed=len(done),
        not_completed=len({r.repeat for r in runs} - repeats_done),
        batch_per_rank=_first(r.batch_per_rank for r in runs),
        global_batch=_first(r.global_batch for r in runs),
        nodes=_first(r.nodes for r in runs),
        step_s=step,
        samples_per_s=_spread(done, lambda r: r.summary.get("samples_per_s")),
        speedup=_with_median(Spread.of([speedups[r.run_id] for r in done if r.run_id in speedups]),
                             pair[0] if pair else None),
        efficiency=_with_median(Spread.of([efficiencies[r.run_id] for r in done if r.run_id in efficiencies]),
                                pair[1] if pair else None),
        shares=shares,
        parts_s={name: share * step.median for name, share in shares.items()} if step else {},
        comm_s=_spread(done, lambda r: r.summary.get("comm_s")),
        comm_exposed_s=_spread(done, lambda r: r.summary.get("comm_exposed_s")),
        overlap=_median([r.summary.get("overlap") for r in done]),
        busbw_GBps=_median([r.busbw_GBps() for r in done]),
        memory_bytes={k: _median([r.memory_max.get(k) for r in done]) for k in memory_keys},
        bound=size_bound(done, shares),
        comm_wait_frac=_median([r.summary.get("comm_wait_frac") for r in done]),
        straggler=common_straggler(done),
        waiting=_median_run(done).summary.get("waiting") if done else None,
        arithmetic_frac=_median([r.summary.get("arithmetic_frac") for r in done]),
        memory_frac=_median([r.summary.get("memory_frac") for r in done]),
        model_state_bytes=_median([r.model_state_bytes() for r in done]),
        predicted_model_state_bytes=_median([r.predicted_model_state_bytes() for r in done]),
        predicted_ddp_model_state_bytes=_median([r.memory_model.get("ddp_model_state") for r in done]),
        comm_kinds=kind_medians(done),
    )


def kind_medians(runs: Sequence[RunRecord]) -> dict[str, dict[str, float]]:
    """Each recorded kind of collective: median over the runs of its busy time, exposed time and bytes."""
    kinds = dict.fromkeys(k for r in runs for k in kinds_of(r.strategy))
    out = {}
    for kind in kinds:
        values = {suffix.removeprefix("_"): _median([r.number(f"comm_{kind}{suffix}") for r in runs])
                  for suffix in KIND_SUFFIXES}
        if all(v is not None for v in values.values()):
            out[kind] = values
    return out


def _with_median(spread: Spread | None, median: float | None) -> Spread | None:
    """The point's value is T(b)/T(N) (docs/contract.md); the per-run values give only the range around it."""
    if spread is None or median is None:
        return spread
    return Spread(median, min(spread.low, median), max(spread.high, median), spread.count)


def _first(values) -> Any:
    return next((v for v in values if v is not None), None)


def study_stats(records: StudyRecords) -> StudyStats:
    done = [r for r in records.runs if r.completed]
    base = min((r.world_size for r in done), default=None)
    t_base = _median([r.summary["step_s"] for r in done if r.world_size == base]) if base else None
    stats = StudyStats(records, base, waterfall=study_waterfall(records))
    if t_base:
        for run in done:
            pair = scaling_pair(records.kind, t_base, run.summary["step_s"], base, run.world_size)
            if pair:
                stats.run_speedup[run.run_id], stats.run_efficiency[run.run_id] = pair
    for world_size in sorted({r.world_size for r in records.runs}):
        runs = [r for r in records.runs if r.world_size == world_size]
        if any(r.completed for r in runs):
            stats.sizes.append(size_stats(records.kind, world_size, runs, t_base, base,
                                          stats.run_speedup, stats.run_efficiency))
    add_intervals(stats)
    return stats


def add_intervals(stats: StudyStats) -> None:
    """Each size's intervals; speedup and efficiency from the drawn step times of the size and the baseline."""
    done = [r for r in stats.records.runs if r.completed]
    by_size = {s.world_size: [r for r in done if r.world_size == s.world_size] for s in stats.sizes}
    steps = {n: intervals.point_draws(runs, "step_s", intervals.median_of("step_s")) for n, runs in by_size.items()}
    base = steps.get(stats.baseline)
    for size in stats.sizes:
        runs = by_size[size.world_size]
        for key in ("step_s", "samples_per_s", "busbw_GBps"):
            found = intervals.median_interval(runs, key)
            if found is not None:
                size.intervals[key] = found
        for name in SHARES:
            found = intervals.share_interval(runs, f"{name}_s")
            if found is not None:
                size.intervals[f"{name}_frac"] = found
        draws = steps.get(size.world_size)
        if base is None or draws is None or size.speedup is None or size.efficiency is None:
            continue
        ratio = base / draws
        n, b = size.world_size, stats.baseline
        if stats.kind == "strong":
            speedup, efficiency = ratio, ratio * b / n
        elif stats.kind == "weak":
            speedup, efficiency = ratio * n / b, ratio
        else:
            continue
        size.intervals["speedup"] = intervals.of_draws(size.speedup.median, speedup)
        size.intervals["efficiency"] = intervals.of_draws(size.efficiency.median, efficiency)


def failed_points(stats: StudyStats) -> list[tuple[str, str]]:
    """(run id, cause) of points with no completed run; superseded failed attempts are not listed."""
    completed = {(r.world_size, r.repeat, None) for r in stats.records.runs if r.completed}
    completed |= {(1, r.repeat, r.solo_batch) for r in stats.records.controls if r.completed}
    out: dict[tuple[int, int | None, int | None], tuple[str, str]] = {}
    for run in stats.records.runs:
        key = (run.world_size, run.repeat, None)
        if not run.completed and key not in completed:
            out[key] = (run.run_id, run.error or f"status {run.status}")
    for point in stats.records.missing_points:
        key = (point.get("world_size"), point.get("repeat"), point.get("solo_batch"))
        if key not in completed:
            out.setdefault(key, (str(point.get("run_id")), str(point.get("error") or "failed before writing records")))
    return [out[k] for k in sorted(out, key=lambda k: (k[2] is not None, k[0] or 0, k[1] or 0, k[2] or 0))]
