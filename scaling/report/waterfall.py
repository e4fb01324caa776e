"""Why efficiency is lost: ``T(N) - T_ideal(N)`` split into additive terms (docs/contract.md, "Where efficiency goes").

Per world size N, every input a median over repeats, in seconds per step:

- ``T`` = T(N) (summary.step_s); ``T_ideal`` = T(b)*b/N (strong) or T(b) (weak), b the baseline size
- ``S`` = step_s of a single-process run at N's per-rank batch (the solo control, or the study's own
  1-process point when it runs that batch); ``C`` = run.json controls.nocomm_step_s at N
- ``d`` = data_s(N) - data_s(solo), ``o`` = other_s(N) - other_s(solo)

=====================  =================================================
``loss_batch_s``       S - T_ideal (strong); 0 (weak)
``loss_contention_s``  C - S - d - o (strong); C - T_ideal - d - o (weak)
``loss_data_s``        d
``loss_other_s``       o
``loss_interference_s`` T - C - loss_comm_exposed_s - loss_comm_wait_s
``loss_comm_exposed_s`` comm_exposed_s - comm_wait_s
``loss_comm_wait_s``   comm_wait_s
=====================  =================================================

They sum to ``T - T_ideal``; a term in points of efficiency is ``100 * term / T`` (efficiency =
T_ideal/T, so the points add up to 100 * (1 - efficiency)). A term that needs a control the records
lack is None, and ``unsplit_s`` holds what those terms add up to, with the reason. At the baseline
every term is 0 when b = 1 (the measured step is the ideal one by definition).

Each term has a 95% interval from the same two-level bootstrap as the report's other figures
(``scaling.report.intervals``): every input is drawn (steps within runs, repeats across runs; the
no-communication control's per-run medians across runs only), the split is made once per draw, and the
term's interval is that of its draws. A term whose interval spans zero is **within noise**: the findings
never give it as a reason (the sentence folds such terms into one "within noise" part), the table and the
plot show its interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scaling.report import intervals
from scaling.report.intervals import Interval
from scaling.report.study_folder import RunRecord, StudyRecords, collectives, common_straggler

TERMS = ("batch", "contention", "data", "other", "interference", "comm_exposed", "comm_wait")
"""In waterfall order: from what one process at the smaller batch costs, through sharing the machine,
to what communication adds."""
TERM_LABELS = {"batch": "smaller batch", "contention": "contention", "data": "data loading",
               "other": "framework overhead", "interference": "interference", "comm_exposed": "exposed all-reduce",
               "comm_wait": "waiting for slower ranks"}


SKEW_LABEL = "skew (ranks take turns being last)"
"""The waiting term where no rank is to blame (scaling.records.waiting)."""


def column(term: str) -> str:
    """The results.csv column of a term."""
    return f"loss_{term}_s"


@dataclass(frozen=True)
class Inputs:
    """The medians one world size's split is made of (seconds per step; None where the records lack it)."""

    kind: str
    world_size: int
    baseline: int
    step_s: float
    ideal_step_s: float
    solo_step_s: float | None
    nocomm_step_s: float | None
    comm_exposed_s: float | None
    comm_wait_s: float | None
    data_s: float | None
    other_s: float | None
    solo_data_s: float | None
    solo_other_s: float | None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def split(x: Inputs) -> dict[str, float | None]:
    """The terms of ``x.step_s - x.ideal_step_s``; None where an input is missing."""
    if x.world_size == x.baseline == 1:
        return dict.fromkeys(TERMS, 0.0)
    exposed, wait = x.comm_exposed_s, x.comm_wait_s
    if x.world_size == 1:  # no peer: nothing is communicated
        exposed, wait = 0.0, 0.0
    d, o = _minus(x.data_s, x.solo_data_s), _minus(x.other_s, x.solo_other_s)
    if x.kind == "strong":
        batch = _minus(x.solo_step_s, x.ideal_step_s)
        start = x.solo_step_s
    else:
        batch, start = 0.0, x.ideal_step_s
    contention = None
    if all(v is not None for v in (x.nocomm_step_s, start, d, o)):  # also for arrays of draws
        contention = x.nocomm_step_s - start - d - o
    # Records older than comm_wait_s: the waiting stays inside the exposed term.
    exposed_only = None if exposed is None else exposed - (0.0 if wait is None else wait)
    interference = None
    if x.nocomm_step_s is not None and exposed is not None:
        interference = x.step_s - x.nocomm_step_s - exposed
    return {"batch": batch, "contention": contention, "data": d, "other": o, "interference": interference,
            "comm_exposed": exposed_only, "comm_wait": wait}


@dataclass(frozen=True)
class SizeWaterfall:
    """One world size: from T_ideal up to T, term by term."""

    world_size: int
    batch_per_rank: int | None
    inputs: Inputs
    terms_s: dict[str, float | None]
    missing: tuple[str, ...] = ()
    """Why some terms are None: the controls the records lack."""
    straggler: dict[str, Any] | None = None
    skew: bool = False
    """The waiting is skew: the runs name no straggler although ranks waited."""
    exposed_label: str = TERM_LABELS["comm_exposed"]
    """The exposed-communication term named after the strategy's collectives ("exposed all-gather and
    reduce-scatter" under fsdp)."""
    intervals: dict[str, Interval] = field(default_factory=dict)
    """95% bootstrap intervals of each term (by term name), of ``ideal`` (T_ideal) and ``step`` (T), in seconds;
    absent where an input has no steps to draw."""

    def within_noise(self, term: str) -> bool:
        """The term's interval spans zero: it may be nothing at all."""
        found = self.intervals.get(term)
        return found is not None and found.spans(0.0)

    @property
    def step_s(self) -> float:
        return self.inputs.step_s

    @property
    def ideal_step_s(self) -> float:
        return self.inputs.ideal_step_s

    @property
    def loss_s(self) -> float:
        return self.step_s - self.ideal_step_s

    @property
    def efficiency(self) -> float:
        return self.ideal_step_s / self.step_s

    @property
    def unsplit_s(self) -> float | None:
        """What the None terms add up to; None when every term is known."""
        if all(v is not None for v in self.terms_s.values()):
            return None
        return self.loss_s - sum(v for v in self.terms_s.values() if v is not None)

    def points(self, seconds: float) -> float:
        """Points of efficiency (percentage points) that ``seconds`` per step cost."""
        return 100.0 * seconds / self.step_s

    def columns(self) -> dict[str, float | None]:
        """results.csv's loss columns of this world size."""
        return {"world_step_s": self.step_s, "ideal_step_s": self.ideal_step_s,
                **{column(t): self.terms_s[t] for t in TERMS}, "loss_unsplit_s": self.unsplit_s}


@dataclass
class StudyWaterfall:
    study: str
    kind: str
    baseline: int | None
    sizes: list[SizeWaterfall] = field(default_factory=list)
    problem: str | None = None
    """Why there is no split at all (no baseline, kind unknown)."""

    def size(self, world_size: int) -> SizeWaterfall | None:
        return next((s for s in self.sizes if s.world_size == world_size), None)

    def shown(self) -> list[SizeWaterfall]:
        """The sizes worth drawing: all but the baseline, whose efficiency is 100 % by definition (nothing
        lost to split; at a baseline of several processes its terms against the solo controls would only
        be cancelled by an equal "not split" remainder)."""
        return [s for s in self.sizes if s.world_size != self.baseline]


# -- from the records -------------------------------------------------------------------------


def _median(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(present) if present else None


def _of(runs: Sequence[RunRecord], key: str) -> float | None:
    return _median([r.number(key) for r in runs])


def _first(values: Sequence[Any]) -> Any:
    return next((v for v in values if v is not None), None)


def solo_missing(records: StudyRecords, batch: int | None) -> str:
    """Why no single-process run at this per-rank batch completed."""
    name = f"solo-b{batch}"
    tried = [r for r in records.controls if r.solo_batch == batch]
    if tried:
        return f"no solo control at per-rank batch {batch} ({name} did not complete: {tried[-1].error or tried[-1].status})"
    if records.definition.get("controls") is False:
        return f"no solo control at per-rank batch {batch} (study.controls=false)"
    if records.definition and "controls" not in records.definition:
        return f"no solo control at per-rank batch {batch} (the study was run before controls existed)"
    return f"no solo control at per-rank batch {batch} (run {name}, or the study with study.controls=true)"


def _draws(runs: Sequence[RunRecord], key: str) -> np.ndarray | None:
    return intervals.point_draws(runs, key, intervals.median_of(key)) if runs else None


def term_intervals(inputs: Inputs, terms: dict[str, float | None], done: Sequence[RunRecord],
                   solo: Sequence[RunRecord], base_draws: np.ndarray | None) -> dict[str, Interval]:
    """Each term's interval: the split made once per bootstrap draw of its inputs."""
    step = _draws(done, "step_s")
    if step is None or base_draws is None:
        return {}
    scale = inputs.baseline / inputs.world_size if inputs.kind == "strong" else 1.0
    drawn = Inputs(
        kind=inputs.kind, world_size=inputs.world_size, baseline=inputs.baseline, step_s=step,
        ideal_step_s=base_draws * scale, solo_step_s=_draws(solo, "step_s"),
        nocomm_step_s=intervals.value_draws([r.controls.get("nocomm_step_s") for r in done],
                                     f"nocomm_step_s:{inputs.world_size}"),
        comm_exposed_s=_draws(done, "comm_exposed_s"), comm_wait_s=_draws(done, "comm_wait_s"),
        data_s=_draws(done, "data_s"), other_s=_draws(done, "other_s"),
        solo_data_s=_draws(solo, "data_s"), solo_other_s=_draws(solo, "other_s"))
    out = {"ideal": intervals.of_draws(inputs.ideal_step_s, drawn.ideal_step_s), "step": intervals.of_draws(inputs.step_s, step)}
    for term, draws in split(drawn).items():
        if terms.get(term) is not None and draws is not None:
            out[term] = intervals.of_draws(terms[term], np.broadcast_to(np.asarray(draws, dtype=float), step.shape))
    return out


def size_waterfall(records: StudyRecords, world_size: int, baseline: int, t_base_s: float,
                   base_draws: np.ndarray | None = None) -> SizeWaterfall | None:
    done = [r for r in records.runs if r.completed and r.world_size == world_size]
    step_s = _of(done, "step_s")
    if step_s is None or step_s <= 0:
        return None
    batch = _first([r.batch_per_rank for r in done])
    solo = records.solo_runs(batch)
    ideal = t_base_s * baseline / world_size if records.kind == "strong" else t_base_s
    inputs = Inputs(
        kind=records.kind, world_size=world_size, baseline=baseline, step_s=step_s, ideal_step_s=ideal,
        solo_step_s=_of(solo, "step_s"),
        nocomm_step_s=_median([r.controls.get("nocomm_step_s") for r in done]),
        comm_exposed_s=_of(done, "comm_exposed_s"), comm_wait_s=_of(done, "comm_wait_s"),
        data_s=_of(done, "data_s"), other_s=_of(done, "other_s"),
        solo_data_s=_of(solo, "data_s"), solo_other_s=_of(solo, "other_s"),
    )
    terms = split(inputs)
    missing = []
    if None not in terms.values() or world_size == baseline == 1:
        pass
    else:
        if inputs.solo_step_s is None:
            missing.append(solo_missing(records, batch))
        if inputs.nocomm_step_s is None and records.strategy == "fsdp":
            missing.append(f"no no-communication control steps at {world_size} processes: fsdp gathers its "
                           "parameters in every step, so no step runs without communication")
        elif inputs.nocomm_step_s is None:
            missing.append(f"no no-communication control steps at {world_size} processes "
                           "(instrument.control_steps=0, or records from before the controls)")
        if inputs.comm_exposed_s is None and world_size > 1:
            missing.append(f"no exposed communication recorded at {world_size} processes "
                           "(instrument.enabled=false)")
    named = common_straggler(done)
    skew = named is None and any((r.summary.get("waiting") or {}).get("kind") == "skew" for r in done)
    return SizeWaterfall(world_size, batch, inputs, terms, tuple(missing), named, skew,
                         exposed_label(records.strategy), term_intervals(inputs, terms, done, solo, base_draws))


def exposed_label(strategy: str) -> str:
    """The exposed-communication term in words: DDP's all-reduce, or the strategy's own collectives."""
    return TERM_LABELS["comm_exposed"] if strategy == "ddp" else f"exposed {collectives(strategy)}"


def study_waterfall(records: StudyRecords) -> StudyWaterfall:
    done = [r for r in records.runs if r.completed]
    baseline = min((r.world_size for r in done), default=None)
    out = StudyWaterfall(records.name, records.kind, baseline)
    if baseline is None:
        out.problem = "no completed run"
        return out
    if records.kind not in ("strong", "weak"):
        out.problem = "the study is neither strong nor weak scaling, so there is no ideal step time"
        return out
    t_base = _of([r for r in done if r.world_size == baseline], "step_s")
    if not t_base:
        out.problem = "the baseline has no step time"
        return out
    base_draws = _draws([r for r in done if r.world_size == baseline], "step_s")
    for world_size in sorted({r.world_size for r in done}):
        size = size_waterfall(records, world_size, baseline, t_base, base_draws)
        if size is not None:
            out.sizes.append(size)
    return out


# -- words ------------------------------------------------------------------------------------


def procs(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def rounded(values: Sequence[float], decimals: int) -> list[float]:
    """Values rounded so that they add up to their rounded sum (largest remainders get the last units)."""
    unit = 10.0 ** -decimals
    scaled = [v / unit for v in values]
    floors = [math.floor(v) for v in scaled]
    short = round(sum(scaled)) - sum(floors)
    order = sorted(range(len(values)), key=lambda i: scaled[i] - floors[i], reverse=True)
    for i in order[:max(0, short)]:
        floors[i] += 1
    return [round(f * unit, decimals) for f in floors]


def points_text(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def term_label(term: str, size: SizeWaterfall) -> str:
    """The term's name; the waiting names the straggler and where it lost its time."""
    if term == "comm_wait" and size.straggler:
        phase = f", slow in {size.straggler['phase']}" if size.straggler.get("phase") else ""
        return f"waiting for rank {size.straggler['rank']}{phase}"
    if term == "comm_wait" and size.skew:
        return SKEW_LABEL
    return size.exposed_label if term == "comm_exposed" else TERM_LABELS[term]


def sentence(size: SizeWaterfall) -> str:
    """e.g. "Of the 63 points of efficiency lost at 2 processes (efficiency 37%): 13 smaller batch, 9 contention,
    20 interference, 21 exposed all-reduce." Points are rounded so that the parts add up to the total shown;
    parts that round to 0 are left out."""
    total = size.points(size.loss_s)
    decimals = 0 if abs(total) >= 10 else 1
    parts = [(term_label(t, size), size.points(v)) for t, v in size.terms_s.items()
             if v is not None and not size.within_noise(t)]
    noise = [t for t, v in size.terms_s.items() if v is not None and size.within_noise(t)]
    if noise:  # never a reason: together, under their own name
        parts.append((f"within noise ({', '.join(term_label(t, size) for t in noise)}: intervals span 0)",
                      sum(size.points(size.terms_s[t]) for t in noise)))
    if size.unsplit_s is not None:
        parts.append((f"not split ({'; '.join(size.missing)})", size.points(size.unsplit_s)))
    shown = [(label, value) for (label, _), value in zip(parts, rounded([p for _, p in parts], decimals)) if value]
    head = (f"Of the {points_text(abs(total), decimals)} points of efficiency "
            f"{'lost' if total >= 0 else 'gained (faster than ideal)'} at {procs(size.world_size)} "
            f"(efficiency {100 * size.efficiency:.0f}%)")
    if not shown:
        return head + ": no term reaches the precision shown."
    return head + ": " + ", ".join(f"{points_text(v, decimals)} {label}" for label, v in shown) + "."


def finding(waterfall: StudyWaterfall) -> str | None:
    """One sentence for the study: the split at its largest world size."""
    shown = waterfall.shown()
    if not shown:
        return None
    return sentence(shown[-1])


def ms_decimals(step_s: float) -> int:
    """Decimals of milliseconds that show a step of this length to about 3 significant digits."""
    value = abs(step_s) * 1e3
    return 0 if value >= 100 else (1 if value >= 10 else (2 if value >= 1 else 3))


def ms(seconds: float, decimals: int | None = None) -> str:
    places = ms_decimals(seconds) if decimals is None else decimals
    return f"{seconds * 1e3:.{places}f}"


NULL = "–"


def cell(size: SizeWaterfall, seconds: float | None, term: str | None = None) -> str:
    if seconds is None:
        return NULL
    places = ms_decimals(size.step_s) + 1
    found = size.intervals.get(term) if term else None
    spread = f" ± {ms(found.half_width, places)}" if found is not None else ""
    noise = ", within noise" if term and size.within_noise(term) else ""
    return f"{ms(seconds, places)}{spread} ms ({size.points(seconds):+.1f} pts{noise})"


def table(waterfall: StudyWaterfall) -> tuple[list[str], list[list[str]]]:
    """Rows: the ideal step, each term, what is not split, the measured step; one column per world size."""
    sizes = waterfall.shown()
    headers = ["", *(procs(s.world_size) for s in sizes)]
    rows = [["ideal step T_ideal", *(f"{ms(s.ideal_step_s, ms_decimals(s.step_s) + 1)} ms" for s in sizes)]]
    labels = {**TERM_LABELS, "comm_exposed": sizes[0].exposed_label if sizes else TERM_LABELS["comm_exposed"]}
    rows += [[f"+ {labels[t]}", *(cell(s, s.terms_s[t], t) for s in sizes)] for t in TERMS]
    if any(s.unsplit_s is not None for s in sizes):
        rows.append(["+ not split (control missing)", *(cell(s, s.unsplit_s) for s in sizes)])
    rows.append(["= measured step T", *(f"{ms(s.step_s, ms_decimals(s.step_s) + 1)} ms" for s in sizes)])
    rows.append(["efficiency T_ideal/T", *(f"{100 * s.efficiency:.0f}%" for s in sizes)])
    return headers, rows
