"""``python -m scaling.report runs/<study> [runs/<other> ...] [--wandb]``.

Reads the records of every run (run.json, config.yaml, steps.jsonl) and writes
results.csv, report.md, a self-contained report.html and plots/*.png. It never
imports torch: the records are the contract between training and reporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.report import configdiff, findings, metrics, render, table
from scaling.report.records import StudyRecords, load_study


@dataclass
class Report:
    out_dir: Path
    document: render.Document
    files: list[Path] = field(default_factory=list)

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


def analyse(study_dirs: list[Path]) -> render.Document:
    loaded: list[StudyRecords] = [load_study(Path(d)) for d in study_dirs]
    studies = [metrics.study_stats(r) for r in loaded]
    diffs = configdiff.differing_keys(loaded) if len(loaded) > 1 else []
    return render.Document(
        studies=studies,
        diffs=diffs,
        findings={st.name: findings.study_findings(st) for st in studies},
        comparison=findings.comparison_findings(studies, diffs),
        runs=table.rows(studies),
        plots=[],
        warnings=[w for r in loaded for w in r.warnings],
    )


def build_report(study_dirs: list[Path], out_dir: Path | None = None) -> Report:
    """Write results.csv, report.md, report.html and plots/ into ``out_dir``."""
    study_dirs = [Path(d) for d in study_dirs]
    out = Path(out_dir) if out_dir is not None else default_out_dir(study_dirs)
    out.mkdir(parents=True, exist_ok=True)
    doc = analyse(study_dirs)
    from scaling.report import plots  # matplotlib only when figures are drawn

    doc.plots = plots.draw_all(doc.studies, out / "plots")
    table.write_csv(out / "results.csv", doc.runs)
    (out / "report.md").write_text(render.markdown(doc, out))
    (out / "report.html").write_text(render.html_page(doc, out))
    return Report(out, doc, [out / "results.csv", out / "report.md", out / "report.html", *doc.plots])


def console_text(report: Report) -> str:
    return render.console(report.document, report.out_dir)
