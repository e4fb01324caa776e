"""How noisy a number is: a bootstrap interval from the steps within each run and the repeats across runs.

The method (a two-level percentile bootstrap, ``RESAMPLES`` draws, seeded, so that a report is the same
each time it is made):

1. within each run, its measured steps are drawn with replacement and the run's statistic is made from the
   draw (the median of a step key, or a share: a part summed over the drawn steps over their summed
   ``step_s``), as the run's summary makes it from all steps;
2. across the runs of a point (its repeats), the runs are drawn with replacement and the point's value is the
   median of the drawn runs' values, as the report makes it from all runs.

The interval is the 2.5th to 97.5th percentile of the draws (``CONFIDENCE``). What it assumes: the steps of a
run are exchangeable (independent draws of one step-time distribution; a drift within the run, throttling say,
widens the interval instead of being seen as a trend), and so are the repeats of a point. With one repeat the
run-to-run part is unknown and the interval is that of the steps alone: too narrow whenever runs differ more
than steps do (they do on shared machines), which the report says. Values that only exist per run (the
no-communication control's median) are drawn at the second level only.

A derived number (speedup, efficiency, a waterfall term) is computed once per draw from its inputs' draws,
each point's drawn independently: the interval of a difference or ratio carries both sides' noise.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scaling.report.study_folder import RunRecord

RESAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A value and its bootstrap interval."""

    value: float
    low: float
    high: float

    def spans(self, x: float = 0.0) -> bool:
        """The interval holds ``x``: for a difference, zero is within noise."""
        return self.low <= x <= self.high

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def scaled(self, factor: float) -> Interval:
        return Interval(self.value * factor, self.low * factor, self.high * factor)

    def text(self, places: int = 2, scale: float = 1.0, unit: str = "") -> str:
        """``12.30 ± 0.41`` (the half-width of the interval; asymmetric intervals show their ends)."""
        v, lo, hi = self.value * scale, self.low * scale, self.high * scale
        if abs((hi - v) - (v - lo)) > 0.5 * max(hi - lo, 1e-300):
            return f"{v:.{places}f}{unit} [{lo:.{places}f}, {hi:.{places}f}]"
        return f"{v:.{places}f} ± {(hi - lo) / 2:.{places}f}{unit}"

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def of_draws(value: float, draws: np.ndarray) -> Interval:
    alpha = (1 - CONFIDENCE) / 2
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return Interval(value, value, value)
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return Interval(value, float(min(low, value)), float(max(high, value)))


def _rng(*parts: Any) -> np.random.Generator:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _column(steps: Sequence[dict[str, Any]], key: str) -> np.ndarray | None:
    values = [s.get(key) for s in steps]
    if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        return None
    return np.asarray(values, dtype=float)


Statistic = Callable[[Sequence[dict[str, Any]], np.ndarray], np.ndarray | None]
"""(a run's steps, indices [draws, steps]) -> the run's statistic per draw; None where the run lacks the key."""


def median_of(key: str) -> Statistic:
    def stat(steps: Sequence[dict[str, Any]], idx: np.ndarray) -> np.ndarray | None:
        column = _column(steps, key)
        return None if column is None else np.median(column[idx], axis=1)
    return stat


def share_of(key: str) -> Statistic:
    """A part summed over the drawn steps over their summed step time (the summary's ``<part>_frac``)."""
    def stat(steps: Sequence[dict[str, Any]], idx: np.ndarray) -> np.ndarray | None:
        part, step = _column(steps, key), _column(steps, "step_s")
        if part is None or step is None:
            return None
        return part[idx].sum(axis=1) / step[idx].sum(axis=1)
    return stat


def run_draws(run: RunRecord, name: str, stat: Statistic, resamples: int = RESAMPLES) -> np.ndarray | None:
    steps = run.steps
    if not steps:
        return None
    idx = _rng(run.folder, name, "steps").integers(0, len(steps), size=(resamples, len(steps)))
    return stat(steps, idx)


def point_draws(runs: Sequence[RunRecord], name: str, stat: Statistic,
                resamples: int = RESAMPLES) -> np.ndarray | None:
    """The point's value (median over its runs of each run's statistic) per draw, both levels drawn."""
    per_run = [d for d in (run_draws(r, name, stat, resamples) for r in runs) if d is not None]
    if not per_run:
        return None
    table = np.stack(per_run)  # [run, draw]
    picks = _rng(*(r.folder for r in runs), name, "runs").integers(0, len(per_run), size=(resamples, len(per_run)))
    return np.median(table[picks, np.arange(resamples)[:, None]], axis=1)


def value_draws(values: Sequence[float], name: str, resamples: int = RESAMPLES) -> np.ndarray | None:
    """Per-run values only (a control's median): the median over runs drawn with replacement."""
    present = np.asarray([float(v) for v in values if isinstance(v, (int, float))], dtype=float)
    if present.size == 0:
        return None
    picks = _rng(name, *present.tolist()).integers(0, present.size, size=(resamples, present.size))
    return np.median(present[picks], axis=1)


def median_interval(runs: Sequence[RunRecord], key: str) -> Interval | None:
    """The point's median of ``key`` (median over runs of the run's median) with its interval."""
    value = _point_value(runs, key)
    draws = point_draws(runs, key, median_of(key))
    return None if value is None or draws is None else of_draws(value, draws)


def share_interval(runs: Sequence[RunRecord], key: str) -> Interval | None:
    """The point's share of ``key`` (median over runs of each run's summary share) with its interval."""
    values = [r.number(key.removesuffix("_s") + "_frac") for r in runs]
    values = [v for v in values if v is not None]
    draws = point_draws(runs, f"share:{key}", share_of(key))
    return None if not values or draws is None else of_draws(statistics.median(values), draws)


def _point_value(runs: Sequence[RunRecord], key: str) -> float | None:
    values = [v for v in (r.number(key) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def runs_note(runs: Sequence[RunRecord]) -> str | None:
    """Said beside an interval made from one run: the run-to-run noise is not in it."""
    return "one run: the interval holds the step-to-step noise only" if len(runs) == 1 else None
