"""The report of an inference folder: a run folder holding ``infer.json``, or a study folder of them.

Writes ``report.md`` (one table per run: batch size, p50/p90/p99 latency,
samples/s, memory, bound; the server scenario; the findings) and redraws each
run's ``latency_throughput.png`` from its ``infer.json``. Never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scaling.infer.schema import INFER_JSON, PLOT

MIB = 1024**2


def infer_runs(folder: Path) -> list[Path]:
    """The run folders holding infer.json: ``folder`` itself, or its subfolders."""
    if (folder / INFER_JSON).is_file():
        return [folder]
    return sorted(p for p in folder.iterdir() if (p / INFER_JSON).is_file())


def is_inference(folder: Path) -> bool:
    """Inference records and no training records (run.json) in ``folder``."""
    runs = infer_runs(folder)
    return bool(runs) and not any(p.is_file() for p in [folder / "run.json", *folder.glob("*/run.json")])


def _run_markdown(run_dir: Path, record: dict[str, Any]) -> list[str]:
    lines = [f"## {record['run_id']}", "",
             f"{record['exp']} ({record['model']}) on {record['device']}, {record['replicas']} replica(s), "
             f"amp={record['amp']}, scenario={record['scenario']}, budget {record['latency_budget_ms']:g} ms p99", "",
             f"![latency against throughput]({(run_dir / PLOT).as_posix()})", "",
             "| batch | queries | p50 ms | p90 ms | p99 ms | max ms | samples/s | weights MiB | activations MiB "
             "| peak MiB | bound | memory-bound share |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for p in sorted(record["batches"], key=lambda p: p["batch_size"]):
        lat, mem = p["latency_s"], p["memory"]
        share = f"{100 * p['memory_frac']:.0f}%" if p.get("memory_frac") is not None else "-"
        lines.append(f"| {p['batch_size']} | {p['queries']} | {lat['p50'] * 1e3:.3f} | {lat['p90'] * 1e3:.3f} | "
                     f"{lat['p99'] * 1e3:.3f} | {lat['max'] * 1e3:.3f} | {p['samples_per_s']:,.1f} | "
                     f"{mem['weights'] / MIB:.2f} | {mem['activations'] / MIB:.2f} | {mem['peak'] / MIB:.2f} | "
                     f"{p.get('compute_bound') or '-'} | {share} |")
    lines += ["", *[f"- {line}" for line in record.get("findings", [])], ""]
    return lines


def render(folders: list[Path], out_dir: Path | None = None) -> str:
    """Write report.md for the inference runs in ``folders``; returns what the console shows."""
    from scaling.infer import plot  # matplotlib only when figures are drawn

    out = Path(out_dir) if out_dir is not None else folders[0]
    out.mkdir(parents=True, exist_ok=True)
    markdown = ["# Inference: latency against throughput", ""]
    console = []
    for folder in folders:
        for run_dir in infer_runs(folder):
            record = json.loads((run_dir / INFER_JSON).read_text())
            plot.draw(record, run_dir / PLOT)
            markdown += _run_markdown(run_dir, record)
            console += [f"{run_dir.name}:", *[f"  {line}" for line in record.get("findings", [])]]
    (out / "report.md").write_text("\n".join(markdown))
    return "\n".join([*console, "", f"  report: {out / 'report.md'}"])
