"""A study's comparison in Weights & Biases: a study-level run and a W&B Report.

``python -m scaling.report runs/<study> --wandb`` writes the local report and then
calls :func:`publish`, which

1. logs one study-level run per study (group = the study name, job_type
   ``study-report``, name ``<study>-report``), holding
   - ``results``: results.csv as a wandb.Table (one row per run);
   - ``plots/<name>``: the report's figures (plots/*.png) as images;
   - history against ``world_size`` (the step metric): ``study/samples_per_s``,
     ``study/step_s``, ``study/speedup``, ``study/efficiency`` and the four
     shares ``study/<part>_frac``, each the median over the repeats of a world size;
2. builds a W&B Report (``wandb_workspaces.reports.v2``) with one runset per
   study filtered on its group, line plots of throughput, speedup and efficiency
   against world size, a bar chart of where the step time goes, throughput per
   run against world size, the results table and the figures;
3. online with credentials: saves the report and prints its URL. Offline, or
   without credentials: saves nothing, writes nothing remote (the study run is
   logged offline), and prints the ``wandb sync`` command for the offline runs
   and the command that publishes the report once they are uploaded::

       python -m scaling.wandb_report runs/<study> [--entity E] [--project P]

:func:`build_report` only builds the report object; it needs no network.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from scaling.errors import describe
from scaling.records.schema import SHARE_FRACS

STUDY_JOB_TYPE = "study-report"
POINT_KEYS = ("samples_per_s", "step_s", "speedup", "efficiency", *SHARE_FRACS)
"""results.csv columns logged per world size on the study run, as ``study/<key>``."""


@dataclass
class Study:
    """What the wandb side needs to know about one study folder."""

    name: str
    kind: str
    folder: Path
    rows: list[dict[str, Any]]
    plots: list[Path]
    project: str | None = None
    entity: str | None = None
    mode: str | None = None

    @property
    def world_sizes(self) -> list[int]:
        return sorted({int(r["world_size"]) for r in self.rows if r.get("world_size") is not None})

    def points(self) -> list[dict[str, Any]]:
        """One row per world size: medians over the completed repeats."""
        out = []
        for n in self.world_sizes:
            # Control points (solo-b<B>) are not points of the curve; they enter through the loss columns.
            done = [r for r in self.rows if r.get("world_size") == n and r.get("step_s") is not None
                    and r.get("role") in (None, "point")]
            if not done:
                continue
            point: dict[str, Any] = {"world_size": n}
            for key in POINT_KEYS:
                values = [r[key] for r in done if isinstance(r.get(key), (int, float))]
                if values:
                    point[f"study/{key}"] = statistics.median(values)
            out.append(point)
        return out


@dataclass
class Publication:
    """What :func:`publish` did."""

    report: Any
    """The wandb_workspaces Report object (saved only when ``url`` is set)."""
    url: str | None = None
    study_runs: list[Path] = field(default_factory=list)
    """Local folders of the study-level runs logged now."""
    offline_runs: list[Path] = field(default_factory=list)
    """Offline run folders to upload with ``wandb sync``."""
    sync_command: str | None = None
    publish_command: str | None = None
    messages: list[str] = field(default_factory=list)


# -- reading a study folder ----------------------------------------------------------------------

def _number(text: str) -> Any:
    if text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_results_csv(path: Path) -> list[dict[str, Any]]:
    """results.csv with numbers as numbers and empty cells as None."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _run_config(folder: Path) -> dict[str, Any]:
    """The config.yaml of the study's first run that has one (for project, entity, mode, kind)."""
    for path in sorted(folder.glob("*/config.yaml")):
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            return data
    return {}


def load_study(folder: Path, rows: Sequence[dict[str, Any]] | None = None,
               plots: Sequence[Path] | None = None) -> Study:
    """A study folder, with its rows (default: its results.csv) and figures (default: plots/*.png)."""
    folder = Path(folder)
    config = _run_config(folder)
    wandb_cfg = (config.get("logger") or {}).get("wandb") or {}
    name = str((config.get("study") or {}).get("name") or folder.name)
    if rows is None:
        csv_path = folder / "results.csv"
        rows = read_results_csv(csv_path) if csv_path.is_file() else []
    own = [dict(r) for r in rows if r.get("study") in (None, name)]
    kind = str(next((r["kind"] for r in own if r.get("kind")), (config.get("study") or {}).get("kind", "adhoc")))
    if plots is None:
        plots = sorted((folder / "plots").glob("*.png"))
    return Study(name=name, kind=kind, folder=folder, rows=own, plots=[Path(p) for p in plots],
                 project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), mode=wandb_cfg.get("mode"))


def offline_runs(study: Study) -> list[Path]:
    """The study's offline wandb runs not yet uploaded: every training run's, and the newest study-level one."""
    runs = [p for p in sorted(study.folder.glob("*/wandb/offline-run-*")) if _unsynced(p)]
    study_level = [p for p in sorted(study.folder.glob("wandb/offline-run-*")) if _unsynced(p)]
    return runs + study_level[-1:]


def _unsynced(run_dir: Path) -> bool:
    files = list(run_dir.glob("run-*.wandb"))
    return bool(files) and not any(f.with_name(f.name + ".synced").exists() for f in files)


# -- the report object ---------------------------------------------------------------------------

def group_filter(study_name: str) -> str:
    """The runset filter that selects a study's runs: its wandb group."""
    return f"Group = {study_name!r}"


def build_report(studies: Sequence[Study], *, project: str, entity: str = "", title: str | None = None):
    """The W&B Report object for ``studies``; built only: nothing is saved or fetched."""
    import wandb_workspaces.reports.v2 as wr

    names = [st.name for st in studies]
    runsets = [wr.Runset(entity=entity, project=project, name=st.name, filters=group_filter(st.name))
               for st in studies]
    speedup_title = "Scaled speedup" if all(st.kind == "weak" for st in studies) else "Speedup"
    panels = [
        wr.LinePlot(title="Throughput vs world size", x="world_size", y=["study/samples_per_s"],
                    title_x="world size (processes)", title_y="samples/s", layout=wr.Layout(x=0, y=0, w=8, h=6)),
        wr.LinePlot(title=f"{speedup_title} vs world size", x="world_size", y=["study/speedup"],
                    title_x="world size (processes)", title_y=speedup_title.lower(),
                    layout=wr.Layout(x=8, y=0, w=8, h=6)),
        wr.LinePlot(title="Scaling efficiency vs world size", x="world_size", y=["study/efficiency"],
                    title_x="world size (processes)", title_y="efficiency", range_y=(0, None),
                    layout=wr.Layout(x=16, y=0, w=8, h=6)),
        wr.BarPlot(title="Where the step goes (share of the median step)", metrics=list(SHARE_FRACS),
                   orientation="h", title_x="share of the median step", layout=wr.Layout(x=0, y=6, w=12, h=8)),
        wr.ScatterPlot(title="Throughput of each run", x=wr.Config("run.world_size"),
                       y=wr.SummaryMetric("samples_per_s"), layout=wr.Layout(x=12, y=6, w=12, h=8)),
        wr.WeavePanelSummaryTable(table_name="results", layout=wr.Layout(x=0, y=14, w=24, h=10)),
    ]
    plot_keys = sorted({f"plots/{p.stem}" for st in studies for p in st.plots})
    if plot_keys:
        panels.append(wr.MediaBrowser(title="Figures of the local report", media_keys=plot_keys,
                                      num_columns=2, layout=wr.Layout(x=0, y=24, w=24, h=12)))
    blocks = [
        wr.P(f"Scaling {'studies' if len(studies) > 1 else 'study'} {', '.join(names)}: each training run is one "
             "wandb run in the study's group; the study-level run (job type "
             f"'{STUDY_JOB_TYPE}') holds the results table, the per-world-size medians and the figures."),
        wr.PanelGrid(runsets=runsets, panels=panels),
        wr.H2("Results"),
        wr.MarkdownBlock(_markdown_points(studies)),
    ]
    return wr.Report(project=project, entity=entity, title=(title or f"Scaling: {' vs '.join(names)}")[:128],
                     description="Throughput, speedup, efficiency and the breakdown of the step time "
                                 "against world size.", blocks=blocks)


def _markdown_points(studies: Sequence[Study]) -> str:
    lines = ["| study | kind | world size | samples/s | speedup | efficiency | exposed comm share |",
             "|---|---|---|---|---|---|---|"]
    for st in studies:
        for point in st.points():
            cells = [_fmt(point.get(f"study/{k}")) for k in ("samples_per_s", "speedup", "efficiency",
                                                             "comm_exposed_frac")]
            lines.append(f"| {st.name} | {st.kind} | {point['world_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


# -- the study-level run -------------------------------------------------------------------------

def log_study_run(study: Study, *, mode: str, project: str, entity: str | None, wandb_dir: Path | None = None) -> Path:
    """Log ``study``'s results, per-world-size medians and figures on a run of job type study-report.

    Returns the run's local folder. The files go to ``<study>/wandb/`` unless WANDB_DIR is set.
    """
    import wandb

    kwargs: dict[str, Any] = dict(
        mode=mode, project=project, entity=entity, name=f"{study.name}-report", group=study.name,
        job_type=STUDY_JOB_TYPE, reinit="create_new",
        config={"study": study.name, "kind": study.kind, "world_sizes": study.world_sizes,
                "runs": len(study.rows), "folder": str(study.folder.absolute())},
        settings=wandb.Settings(init_timeout=60, console="off", silent=True),
    )
    if "WANDB_DIR" not in os.environ:
        kwargs["dir"] = str((wandb_dir or study.folder).absolute())
    run = wandb.init(**kwargs)
    try:
        run.define_metric("world_size")
        run.define_metric("study/*", step_metric="world_size")
        for point in study.points():
            run.log(point)
        columns = list(dict.fromkeys(k for row in study.rows for k in row))
        media: dict[str, Any] = {"results": wandb.Table(columns=columns,
                                                        data=[[row.get(c) for c in columns] for row in study.rows])}
        for path in study.plots:
            media[f"plots/{path.stem}"] = wandb.Image(str(path), caption=path.name)
        run.log(media)
        folder = Path(run.dir).parent
    finally:
        run.finish()
    return folder


# -- publishing ----------------------------------------------------------------------------------

def has_credentials() -> bool:
    """Whether wandb has an API key configured (checked locally; nothing is sent)."""
    import wandb

    try:
        return bool(wandb.login(verify=False, prompt=False))
    except Exception:
        return False


def publish(study_dirs: Sequence[Path], *, out_dir: Path | None = None, results_csv: Path | None = None,
            plots: Sequence[Path] | None = None, rows: Sequence[dict[str, Any]] | None = None,
            mode: str | None = None, project: str | None = None, entity: str | None = None,
            log_study_runs: bool = True, out: TextIO | None = None) -> Publication:
    """Send the studies' comparison to wandb; never raises for a wandb problem.

    study_dirs: the study folders (``<paths.root>/<study.name>``).
    out_dir, results_csv, plots, rows: what ``scaling.report`` wrote (the folder, its
        results.csv, the figures, the rows of results.csv); each study's own
        results.csv and plots/*.png when not given.
    mode: ``online|offline|disabled``; default: ``logger.wandb.mode`` of the studies' runs.
    project, entity: default: ``logger.wandb.project``/``entity`` of the studies' runs.
    log_study_runs: False publishes the report alone (the runs are already uploaded).
    out: where the messages go (stdout by default).

    Online with credentials, the report is saved and its URL printed. Otherwise it
    is built but not saved, and the commands that upload the offline runs and
    publish the report are printed.
    """
    out = out or sys.stdout
    say_lines: list[str] = []

    def say(line: str) -> None:
        say_lines.append(line)
        print(line, file=out, flush=True)

    study_dirs = [Path(d) for d in study_dirs]
    if rows is None and results_csv is not None and Path(results_csv).is_file():
        rows = read_results_csv(Path(results_csv))
    if plots is None and out_dir is not None and len(study_dirs) > 1:
        plots = sorted((Path(out_dir) / "plots").glob("*.png"))
    studies = [load_study(d, rows=rows, plots=plots) for d in study_dirs]
    first = studies[0] if studies else None
    mode = mode or (first.mode if first and first.mode else "offline")
    project = project or (first.project if first else None) or "scaling"
    entity = entity or (first.entity if first else None)

    try:
        report = build_report(studies, project=project, entity=entity or "")
    except Exception as exc:
        say(f"wandb: could not build the W&B report ({describe(exc, limit=300)}); the local report is complete")
        return Publication(report=None, messages=say_lines)
    result = Publication(report=report, messages=say_lines)
    if mode == "disabled":
        say("wandb: logger.wandb.mode is disabled; nothing logged (the local report is complete)")
        return result

    online = mode == "online" and has_credentials()
    why_not_saved = f"mode {mode}" if mode != "online" else "no wandb credentials"
    run_mode = "online" if online else "offline"  # without credentials the study run waits for `wandb sync`
    if log_study_runs:
        for st in studies:
            try:
                folder = log_study_run(st, mode=run_mode, project=project, entity=entity)
                result.study_runs.append(folder)
                say(f"wandb: {run_mode} study run {st.name}-report with {len(st.rows)} result rows "
                    f"and {len(st.plots)} figures ({folder})")
            except Exception as exc:
                say(f"wandb: could not log the study run of {st.name} ({describe(exc, limit=300)})")

    if online:
        try:
            if not entity:
                import wandb

                report.entity = wandb.Api().default_entity
                for block in report.blocks:
                    for runset in getattr(block, "runsets", []):
                        runset.entity = report.entity
            report.save()
            result.url = report.url
            say(f"wandb: report saved: {result.url}")
            return result
        except Exception as exc:
            why_not_saved = f"saving failed: {describe(exc, limit=300)}"

    logged_now = set(result.study_runs)
    for st in studies:
        found = offline_runs(st)
        if logged_now:  # this call's study-level runs replace older ones
            found = [p for p in found if p.parent != st.folder / "wandb"]
        result.offline_runs += found
    result.offline_runs += [p for p in result.study_runs if p not in result.offline_runs]
    if result.offline_runs:
        result.sync_command = "wandb sync " + " ".join(shlex.quote(str(p)) for p in result.offline_runs)
    publish_args = [*map(str, study_dirs), "--project", project] + (["--entity", entity] if entity else [])
    result.publish_command = "python -m scaling.wandb_report " + " ".join(shlex.quote(a) for a in publish_args)
    say(f"wandb: the W&B report was built but not saved ({why_not_saved})"
        + ("." if online else "; nothing was sent."))
    if result.sync_command:
        say(f"  1. upload the offline runs ({len(result.offline_runs)}): wandb login && {result.sync_command}")
    else:
        say("  1. no offline runs found to upload in the study folders (uploaded already?)")
    if os.environ.get("WANDB_DIR"):
        say(f"     runs started with WANDB_DIR set are under it: wandb sync {shlex.quote(os.environ['WANDB_DIR'])}")
    say(f"  2. publish the report: {result.publish_command}")
    return result


# -- command line: publish the report once the runs are uploaded ----------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scaling.wandb_report",
        description="Save the W&B Report of one or more studies whose runs are uploaded (after `wandb sync`).")
    parser.add_argument("studies", nargs="+", type=Path, metavar="STUDY_DIR")
    parser.add_argument("--project", default=None, help="default: logger.wandb.project of the runs")
    parser.add_argument("--entity", default=None, help="default: logger.wandb.entity of the runs, else your default entity")
    args = parser.parse_args(argv)
    for folder in args.studies:
        if not folder.is_dir():
            print(f"scaling.wandb_report: error: {folder} is not a directory", file=sys.stderr)
            return 2
    if not has_credentials():
        print("scaling.wandb_report: error: no wandb credentials; run `wandb login` first", file=sys.stderr)
        return 1
    result = publish(args.studies, mode="online", project=args.project, entity=args.entity, log_study_runs=False)
    return 0 if result.url else 1

