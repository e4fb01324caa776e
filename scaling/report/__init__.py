"""``python -m scaling.report runs/<study> [runs/<other> ...] [--commbench PATH ...] [--wandb]``.

Reads the records of every run (run.json, config.yaml, steps.jsonl) and writes
results.csv, report.md, a self-contained report.html and plots/*.png. It never
imports torch: the records are the contract between training and reporting.
With ``--commbench``, each multi-process world size is also set beside the
commbench result of the same world size and backend (scaling.report.commbench_share).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaling.report import commbench_share, configdiff, findings, metrics, render, strategies, table
from scaling.report.study_folder import StudyRecords, load_study

if TYPE_CHECKING:
    from scaling.predict.report import Result as PredictResult
    from scaling.report.prediction import PredictRequest


@dataclass
class Report:
    out_dir: Path
    document: render.Document
    files: list[Path] = field(default_factory=list)
    prediction: PredictResult | None = None
    """What ``predict`` gave, when asked for."""

    @property
    def studies(self) -> list[metrics.StudyStats]:
        return self.document.studies

    @property
    def warnings(self) -> list[str]:
        return self.document.warnings

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.document.runs


def default_out_dir(study_dirs: list[Path]) -> Path:
    """One study: its own folder. Several: a comparison folder beside the first."""
    if len(study_dirs) == 1:
        return study_dirs[0]
    name = "compare-" + "-vs-".join(p.name for p in study_dirs)
    return study_dirs[0].parent / name[:120]


def analyse(study_dirs: list[Path], benches: list[commbench_share.Bench] | None = None) -> render.Document:
    loaded: list[StudyRecords] = [load_study(Path(d)) for d in study_dirs]
    studies = [metrics.study_stats(r) for r in loaded]
    diffs = configdiff.differing_keys(loaded) if len(loaded) > 1 else []
    strategies.label_studies(studies)
    benches = benches or []
    bandwidth = ({st.name: commbench_share.compare_study(st.name, st.records.runs, benches) for st in studies}
                 if benches else {})
    found = {st.name: findings.study_findings(st) for st in studies}
    for name, comparisons in bandwidth.items():
        found[name] += commbench_share.study_lines(comparisons)
    return render.Document(
        studies=studies,
        diffs=diffs,
        findings=found,
        comparison=findings.comparison_findings(studies, diffs) + strategies.comparison(studies, diffs),
        runs=table.rows(studies, benches),
        plots=[],
        warnings=[w for r in loaded for w in r.warnings],
        benches=benches,
        bandwidth=[c for comparisons in bandwidth.values() for c in comparisons],
    )


def build_report(study_dirs: list[Path], out_dir: Path | None = None, commbench_paths: list[Path] | None = None,
                 predict: PredictRequest | None = None) -> Report:
    """Write results.csv, report.md, report.html and plots/ into ``out_dir``.

    ``commbench_paths``: commbench.json files or their folders to set beside the study
    (CommbenchError when one is not a readable commbench result). ``predict``: the prediction
    (prediction.json and .png) and its section (PredictError when the studies cannot be predicted from).
    """
    study_dirs = [Path(d) for d in study_dirs]
    benches = commbench_share.load(commbench_paths or [])
    out = Path(out_dir) if out_dir is not None else default_out_dir(study_dirs)
    out.mkdir(parents=True, exist_ok=True)
    doc = analyse(study_dirs, benches)
    predicted = None
    if predict is not None:
        from scaling.report.prediction import prediction

        predicted, section = prediction(study_dirs, out, predict)
        doc.sections.append(section)
    from scaling.report import plots, roofline_plot, timeline_plot  # matplotlib only when figures are drawn

    doc.plots = plots.draw_all(doc.studies, out / "plots") + roofline_plot.draw_all(doc.studies, out / "plots")
    timeline = timeline_plot.draw_study(doc.studies, out / "plots" / "timeline.png")
    doc.plots += [timeline] if timeline else []
    table.write_csv(out / "results.csv", doc.runs)
    (out / "report.md").write_text(render.markdown(doc, out))
    (out / "report.html").write_text(render.html_page(doc, out))
    return Report(out, doc, [out / "results.csv", out / "report.md", out / "report.html", *doc.plots,
                             *(predicted.files if predicted else [])], predicted)


def console_text(report: Report) -> str:
    return render.console(report.document, report.out_dir)
