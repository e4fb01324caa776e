"""The report as text: the console table, report.md and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.report import commbench_share, waterfall
from scaling.report.configdiff import KeyDiff, common_settings
from scaling.report.findings import mib
from scaling.report.metrics import Spread, StudyStats
from scaling.report.study_folder import KIND_LABELS
from scaling.report.table import COLUMNS
from scaling.records.schema import SHARES

HOW_TO_READ = [
    "Each point is one torchrun job per world size and repeat; the step time of a run is the median over its "
    "measured steps (warm-up left out), and T(N) is the median over the repeats at N processes.",
    "Strong scaling (global batch fixed): speedup = T(b)/T(N), efficiency = speedup x b/N. Weak scaling (per-rank "
    "batch fixed): efficiency = T(b)/T(N), scaled speedup = efficiency x N/b. b is the smallest world size.",
    "Where the step goes: compute; exposed communication (all-reduce still running after backward's last "
    "gradient was ready; under zero1 and fsdp every collective the training thread waited for: all-gathers, "
    "reduce-scatters, ZeRO-1's broadcast); data loading; framework overhead. Hidden = share of the communication "
    "overlapped with compute. The verdict names the largest share.",
    "Spread: tables show median (min-max) over repeats; the plots draw the same as error bars.",
    "Why efficiency is lost (waterfall): T(N) - T_ideal(N) split into terms that add up to it, in ms per step "
    "and in points of efficiency (100 x term / T(N)): smaller batch (one process at this per-rank batch, the "
    "solo-b<B> control, against T_ideal), contention (the no-communication control steps against the solo "
    "control), data loading and framework overhead beyond the solo control's, interference (the measured step "
    "against the no-communication control, less exposed communication), exposed all-reduce, waiting for "
    "slower ranks. A term whose control is missing shows as '–' and its share as 'not split'.",
    "'–': no value, e.g. communication at 1 process (no peer); left out of every median.",
]
HOW_TO_READ_COMMBENCH = (
    "Beside commbench: the all-reduce bus bandwidth the runs reached (bytes the hook sent over the busy time of "
    "the all-reduce, x 2(n-1)/n; median over repeats) as a share of commbench's all_reduce bus bandwidth for one "
    "message of the runs' mean size on the wire (comm_wire_bytes / comm_buckets), from commbench's fitted alpha-beta "
    "model (the nearest measured size is shown too). Only a commbench result of the same world size and "
    "backend is used. Below 100%: the training all-reduce gets less of the link than the benchmark does "
    "(contention with compute, many small buckets, waiting between buckets)."
)
TABLE_HEADERS = ("world size", "batch/rank", "global batch", "runs ok", "step time (s)", "samples/s",
                 "speedup", "efficiency", "compute", "exposed comm", "data", "other", "hidden", "busbw (GB/s)",
                 "bound")


@dataclass(frozen=True)
class Section:
    """A part of the report that another command computes (``--predict``): a title, its preformatted text and
    its figure, shown after the waterfall in report.md and report.html."""

    title: str
    text: str
    image: Path | None = None


@dataclass
class Document:
    """Everything the writers need, computed once."""

    studies: list[StudyStats]
    diffs: list[KeyDiff]
    findings: dict[str, list[str]]
    comparison: list[str]
    runs: list[dict[str, Any]]
    plots: list[Path]
    warnings: list[str]
    benches: list[commbench_share.Bench] = field(default_factory=list)
    """The commbench results given with --commbench."""
    bandwidth: list[commbench_share.SizeComparison] = field(default_factory=list)
    """Each study's multi-process world sizes against the matching commbench result."""
    sections: list[Section] = field(default_factory=list)

    def how_to_read(self) -> list[str]:
        return HOW_TO_READ + ([HOW_TO_READ_COMMBENCH] if self.benches else [])


def _spread(s: Spread | None, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    if s is None:
        return "-"
    text = f"{s.median * scale:{fmt}}{suffix}"
    if s.count > 1:
        text += f" ({s.low * scale:{fmt}}-{s.high * scale:{fmt}})"
    return text


def _ci(s: Spread | None, found, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    """The median with its 95% bootstrap interval's half-width where one was made (scaling.report.intervals),
    then the min-max over repeats as before."""
    text = _spread(s, fmt, scale, suffix)
    if s is None or found is None:
        return text
    return text.replace(f"{s.median * scale:{fmt}}{suffix}",
                        f"{s.median * scale:{fmt}}{suffix} ±{found.half_width * scale:{fmt}}", 1)


def _pct(x: float | None) -> str:
    return waterfall.NULL if x is None else f"{100 * x:.0f}%"


def size_rows(studies: Sequence[StudyStats], bandwidth: Sequence[commbench_share.SizeComparison] | None = None
              ) -> tuple[list[str], list[list[str]]]:
    """One row per study and world size; with ``bandwidth`` (--commbench given), commbench's bus bandwidth
    at the mean bucket size and the share of it reached."""
    several = len(studies) > 1
    headers = (["study"] if several else []) + list(TABLE_HEADERS)
    if bandwidth is not None:
        headers += ["commbench busbw (GB/s)", "vs commbench"]
    versus = {(c.study, c.world_size): c.at for c in bandwidth or []}
    if studies and all(st.kind == "weak" for st in studies):
        headers[headers.index("speedup")] = "scaled speedup"
    rows = []
    for st in studies:
        for s in st.sizes:
            row = [st.label] if several else []
            row += [
                str(s.world_size), str(s.batch_per_rank or "-"), str(s.global_batch or "-"),
                f"{s.completed}/{s.completed + s.not_completed}",
                _ci(s.step_s, s.intervals.get("step_s"), ".4f"),
                _ci(s.samples_per_s, s.intervals.get("samples_per_s"), ".1f"),
                _ci(s.speedup, s.intervals.get("speedup"), ".2f", suffix="x"),
                _ci(s.efficiency, s.intervals.get("efficiency"), ".0f", 100, "%"),
                *(_pct(s.shares.get(k)) for k in SHARES),
                _pct(s.overlap), waterfall.NULL if s.busbw_GBps is None else f"{s.busbw_GBps:.2f}", s.bound or "-",
            ]
            if bandwidth is not None:
                at = versus.get((st.name, s.world_size))
                row += [commbench_share.gbps(at.reference_GBps), _pct(at.fraction)] if at else ["-", "-"]
            rows.append(row)
    return headers, rows


KIND_HEADERS = ("world size", "collective", "busy (ms)", "exposed (ms)", "on the wire per step")


def kind_rows(studies: Sequence[StudyStats]) -> tuple[list[str], list[list[str]]]:
    """Each kind of collective per study and world size (medians over repeats), where a study runs zero1 or
    fsdp; none for DDP studies alone, whose one kind is the all-reduce of the scaling table."""
    if all(st.strategy == "ddp" for st in studies):
        return [], []
    several = len(studies) > 1
    headers = (["study"] if several else []) + list(KIND_HEADERS)
    rows = []
    for st in studies:
        for s in st.sizes:
            for kind, v in s.comm_kinds.items():
                rows.append(([st.label] if several else []) + [
                    str(s.world_size), KIND_LABELS[kind], f"{v['s'] * 1e3:.2f}", f"{v['exposed_s'] * 1e3:.2f}",
                    mib(v["bytes"])])
    return headers, rows


KIND_INTRO = ("Busy and exposed time and bytes on the wire per step of each kind of collective the strategy issues "
              "(results.csv: comm_<kind>_s, comm_<kind>_exposed_s, comm_<kind>_bytes); with comm_sync_s they add up "
              "to the communication of the scaling table. Medians over repeats.")


def waterfall_tables(doc: Document) -> list[tuple[StudyStats, list[str], list[list[str]]]]:
    """Each study's waterfall table (world sizes as columns), or none where it cannot be split."""
    out = []
    for st in doc.studies:
        if st.waterfall is not None and st.waterfall.shown():
            headers, rows = waterfall.table(st.waterfall)
            out.append((st, headers, rows))
    return out


WATERFALL_INTRO = ("From the ideal step T_ideal (T(b)·b/N strong, T(b) weak) up to the measured step T, term by "
                   "term: ms per step, and points of efficiency in brackets (100 x term / T). Medians over repeats.")


def waterfall_notes(st: StudyStats) -> list[str]:
    if st.waterfall is None:
        return []
    if st.waterfall.problem:
        return [f"{st.name}: no waterfall: {st.waterfall.problem}."]
    notes = []
    for size in st.waterfall.shown():
        notes += [f"{waterfall.procs(size.world_size)}: {m}" for m in size.missing]
    return notes


def run_rows(doc: Document) -> tuple[list[str], list[list[str]]]:
    shown = ("study", "run_id", "status", "world_size", "repeat", "batch_size_per_rank", "step_s", "samples_per_s",
             "efficiency", "bound", "error")
    rows = []
    for run in doc.runs:
        rows.append([_cell(run.get(k)) for k in shown])
    return list(shown), rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- console ----------------------------------------------------------------------------------


def fixed_width(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _bandwidth(doc: Document) -> list[commbench_share.SizeComparison] | None:
    return doc.bandwidth if doc.benches else None


def console(doc: Document, out_dir: Path) -> str:
    headers, rows = size_rows(doc.studies, _bandwidth(doc))
    parts = [fixed_width(headers, rows) if rows else "no completed run to tabulate"]
    parts.append("  (median over repeats; ± half the 95% bootstrap interval of steps and repeats; min-max of the repeats "
                 "in brackets)")
    headers, rows = kind_rows(doc.studies)
    if rows:
        parts += ["\ncommunication by kind (median over repeats)", fixed_width(headers, rows)]
    for st, headers, rows in waterfall_tables(doc):
        parts.append(f"\n{st.name}: why efficiency is lost (ms per step, points of efficiency in brackets)")
        parts.append(fixed_width(headers, rows))
    for st in doc.studies:
        parts.append(f"\n{st.name} ({st.kind} scaling):")
        parts += [f"  - {f}" for f in doc.findings[st.name]]
    if doc.comparison:
        parts.append("\ncomparison:")
        parts += [f"  - {f}" for f in doc.comparison]
    for warning in doc.warnings:
        parts.append(f"warning: {warning}")
    parts.append(f"\nreport: {out_dir / 'report.html'} (also report.md, results.csv, plots/)")
    return "\n".join(parts)


# -- markdown ---------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(doc: Document, out_dir: Path) -> str:
    names = ", ".join(st.name for st in doc.studies)
    out = [f"# Scaling report: {names}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from the records in "
           + ", ".join(f"`{st.records.folder}`" for st in doc.studies) + ".", ""]
    out += ["## Findings", ""]
    for st in doc.studies:
        if len(doc.studies) > 1:
            out += [f"**{st.name}** ({st.kind} scaling)", ""]
        out += [f"- {f}" for f in doc.findings[st.name]] + [""]
    if doc.comparison:
        out += ["**Comparison**", ""] + [f"- {f}" for f in doc.comparison] + [""]
    headers, rows = size_rows(doc.studies, _bandwidth(doc))
    out += ["## Scaling table", "", "Median over repeats, min-max in brackets.", "", md_table(headers, rows), ""]
    headers, rows = kind_rows(doc.studies)
    if rows:
        out += ["## Communication by kind", "", KIND_INTRO, "", md_table(headers, rows), ""]
    out += md_waterfall(doc)
    if doc.benches:
        out += md_commbench(doc, out_dir)
    for section in doc.sections:
        out += [f"## {section.title}", "", "```", section.text, "```", ""]
        if section.image is not None and section.image.exists():
            out += [f"![{section.image.stem}]({section.image.relative_to(out_dir).as_posix()})", ""]
    if len(doc.studies) > 1:
        out += ["## What differs between the studies", ""]
        if doc.diffs:
            out += [md_table(["key", *(st.name for st in doc.studies)],
                             [[d.key, *(d.values[st.name] for st in doc.studies)] for d in doc.diffs]), ""]
        else:
            out += ["No configuration key differs.", ""]
    out += ["## Plots", ""]
    for plot in doc.plots:
        out += [f"![{plot.stem}](plots/{plot.name})", ""]
    headers, rows = run_rows(doc)
    out += ["## Runs", "", "Every run in the study folders (results.csv has all columns).", "", md_table(headers, rows), ""]
    if doc.warnings:
        out += ["## Warnings", ""] + [f"- {w}" for w in doc.warnings] + [""]
    out += ["## How to read this report", ""] + [f"- {t}" for t in doc.how_to_read()] + [""]
    out += ["## Configuration", ""]
    for st in doc.studies:
        settings = common_settings(st.records)
        out += [f"**{st.name}**: settings shared by every run", "", md_table(["key", "value"], sorted(settings.items())), ""]
    return "\n".join(out)


def md_waterfall(doc: Document) -> list[str]:
    tables = waterfall_tables(doc)
    notes = [n for st in doc.studies for n in waterfall_notes(st)]
    if not tables and not notes:
        return []
    out = ["## Why efficiency is lost", "", WATERFALL_INTRO, ""]
    for st, headers, rows in tables:
        if len(doc.studies) > 1:
            out += [f"**{st.name}**", ""]
        out += [md_table(headers, rows), ""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    return out


def md_commbench(doc: Document, out_dir: Path) -> list[str]:
    headers, rows = commbench_share.table(doc.bandwidth, len(doc.studies) > 1)
    for row, c in zip(rows, doc.bandwidth):
        if c.bench is not None:
            row[-1] = f"[{c.bench.run_id}]({commbench_share.relative(c.bench.path, out_dir)})"
    out = ["## Beside commbench", "",
           "The gradient all-reduce of the runs against commbench's all_reduce at the runs' mean bucket size "
           "(fitted model; the nearest measured size beside it).", ""]
    out += [md_table(headers, rows), ""] if rows else ["No multi-process run to compare.", ""]
    for bench in doc.benches:
        out += [f"- [`{bench.path}`]({commbench_share.relative(bench.path, out_dir)}): {bench.describe()}, "
                f"{len(bench.points)} all_reduce sizes, {commbench_share.fit_text(bench)}"]
        if bench.plot is not None:
            link = commbench_share.relative(bench.plot, out_dir)
            out += ["", f"  [![commbench {bench.run_id}]({link})]({link})"]
    return out + [""]


# -- html -------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_e(path.stem)}" src="data:image/png;base64,{data}"></figure>'


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}
img{max-width:100%;border:1px solid #ddd}
.warn{color:#8a4b00}
details{margin:0.5em 0}
code{background:#f4f4f4;padding:0 3px}
"""


def html_commbench(doc: Document, out_dir: Path) -> list[str]:
    headers, rows = commbench_share.table(doc.bandwidth, len(doc.studies) > 1)
    cells = [[_e(c) for c in row] for row in rows]
    for row, c in zip(cells, doc.bandwidth):
        if c.bench is not None:
            row[-1] = f'<a href="{_e(commbench_share.relative(c.bench.path, out_dir))}">{_e(c.bench.run_id)}</a>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells)
    parts = ["<h2>Beside commbench</h2><p>The gradient all-reduce of the runs against commbench's all_reduce at "
             "the runs' mean bucket size (fitted model; the nearest measured size beside it).</p>",
             f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" if rows
             else "<p>No multi-process run to compare.</p>", "<ul>"]
    for bench in doc.benches:
        plot = (f' (<a href="{_e(commbench_share.relative(bench.plot, out_dir))}">commbench.png</a>)'
                if bench.plot is not None else "")
        parts.append(f'<li><a href="{_e(commbench_share.relative(bench.path, out_dir))}"><code>{_e(bench.path)}</code></a>'
                     f"{plot}: {_e(bench.describe())}, {len(bench.points)} all_reduce sizes, "
                     f"{_e(commbench_share.fit_text(bench))}</li>")
    parts.append("</ul>")
    parts += [_img(bench.plot) for bench in doc.benches if bench.plot is not None]
    return parts


def html_waterfall(doc: Document) -> list[str]:
    tables = waterfall_tables(doc)
    notes = [n for st in doc.studies for n in waterfall_notes(st)]
    if not tables and not notes:
        return []
    parts = ["<h2>Why efficiency is lost</h2>", f"<p>{_e(WATERFALL_INTRO)}</p>"]
    for st, headers, rows in tables:
        if len(doc.studies) > 1:
            parts.append(f"<h3>{_e(st.name)}</h3>")
        parts.append(html_table(headers, rows))
    if notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return parts


def html_page(doc: Document, out_dir: Path) -> str:
    names = ", ".join(st.name for st in doc.studies)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Scaling report: {_e(names)}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Scaling report: {_e(names)}</h1>",
             f"<p>Generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} from the records in "
             + ", ".join(f"<code>{_e(st.records.folder)}</code>" for st in doc.studies) + ".</p>",
             "<h2>Findings</h2>"]
    for st in doc.studies:
        if len(doc.studies) > 1:
            parts.append(f"<h3>{_e(st.name)} ({_e(st.kind)} scaling)</h3>")
        parts.append("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in doc.findings[st.name]) + "</ul>")
    if doc.comparison:
        parts.append("<h3>Comparison</h3><ul>" + "".join(f"<li>{_e(f)}</li>" for f in doc.comparison) + "</ul>")
    headers, rows = size_rows(doc.studies, _bandwidth(doc))
    parts += ["<h2>Scaling table</h2><p>Median over repeats, min-max in brackets.</p>", html_table(headers, rows)]
    headers, rows = kind_rows(doc.studies)
    if rows:
        parts += ["<h2>Communication by kind</h2>", f"<p>{_e(KIND_INTRO)}</p>", html_table(headers, rows)]
    parts += html_waterfall(doc)
    if doc.benches:
        parts += html_commbench(doc, out_dir)
    for section in doc.sections:
        parts.append(f"<h2>{_e(section.title)}</h2><pre>{_e(section.text)}</pre>")
        if section.image is not None and section.image.exists():
            parts.append(_img(section.image))
    if len(doc.studies) > 1:
        parts.append("<h2>What differs between the studies</h2>")
        parts.append(html_table(["key", *(st.name for st in doc.studies)],
                                [[d.key, *(d.values[st.name] for st in doc.studies)] for d in doc.diffs])
                     if doc.diffs else "<p>No configuration key differs.</p>")
    parts.append("<h2>Plots</h2>")
    parts += [_img(p) for p in doc.plots]
    headers, rows = run_rows(doc)
    parts += ["<h2>Runs</h2>", html_table(headers, rows)]
    if doc.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{_e(w)}</li>" for w in doc.warnings) + "</ul>")
    parts.append("<h2>How to read this report</h2><ul>" + "".join(f"<li>{_e(t)}</li>" for t in doc.how_to_read()) + "</ul>")
    parts.append("<h2>Configuration</h2>")
    for st in doc.studies:
        settings = common_settings(st.records)
        parts.append(f"<details><summary>{_e(st.name)}: settings shared by every run ({len(settings)})</summary>"
                     + html_table(["key", "value"], sorted(settings.items())) + "</details>")
    parts.append(f"<p><small>results.csv columns: {_e(', '.join(COLUMNS))}</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts)
