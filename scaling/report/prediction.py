"""``scaling.report --predict 8,16,64``: the predictor's table and figure as a section of the study report.

Runs ``scaling.predict`` on the report's study folders (the link fitted on their own bucket
timelines, or ``--predict-link``), writes prediction.json and prediction.png into the report
folder, and gives the report its "Prediction" section (report.md and report.html).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scaling.predict.report import (PREDICTION_PNG, PredictOptions, Result, parse_latency_s, parse_rate_bit_s,
                                    run_prediction)
from scaling.report.render import Section


class PredictError(ValueError):
    """What the predictor cannot work from (no completed run, a link it cannot read), in one line."""


@dataclass(frozen=True)
class PredictRequest:
    """What ``--predict`` and ``--predict-link`` asked for."""

    nprocs: list[int]
    link: str | None = None
    """``RATE[,LATENCY]`` (``10gbit,20us``); None: fitted on the studies' own bucket timelines."""

    @classmethod
    def parse(cls, nprocs: str, link: str | None) -> PredictRequest:
        """From the command line's ``8,16,64``; PredictError on anything else."""
        try:
            return cls(sorted({int(v) for v in nprocs.split(",") if v.strip()}), link)
        except ValueError as exc:
            raise PredictError(str(exc)) from None


def prediction(study_dirs: list[Path], out_dir: Path, request: PredictRequest) -> tuple[Result, Section]:
    """The prediction written into ``out_dir`` and the report section that shows it."""
    rate_bit_s = latency_s = None
    try:
        if request.link is not None:
            rate, _, latency = request.link.partition(",")
            rate_bit_s = parse_rate_bit_s(rate)
            latency_s = parse_latency_s(latency) if latency else None
        result = run_prediction(PredictOptions(runs=list(study_dirs), nprocs=request.nprocs, link_bit_s=rate_bit_s,
                                               link_latency_s=latency_s, link_given=request.link is not None,
                                               out=out_dir))
    except ValueError as exc:
        raise PredictError(str(exc)) from None
    return result, Section("Prediction", result.table, out_dir / PREDICTION_PNG)
