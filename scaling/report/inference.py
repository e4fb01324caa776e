"""The report of an inference folder: a run folder holding ``infer.json``, or a study folder of them.

Writes ``report.md`` (one table per run: batch size, single-stream p50/p90/p99
latency, samples/s and where they come from, memory, bound; the server
scenario, the search's answer and its live replay; the findings) and redraws
each run's ``latency_throughput.png`` from its ``infer.json``. A failed run is
shown with its error and the batch sizes it finished. Never imports torch.
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


def _ms(value: float | None) -> str:
    return f"{value * 1e3:.3f}" if value is not None else "-"


def _server_markdown(server: dict[str, Any], budget_ms: float) -> list[str]:
    """The search's answer and the next rate up, simulated and, where replayed, served live."""
    lines = ["| server | queries/s | simulated p99 ms | live p99 ms | live queries | live mean batch | meets budget |",
             "|---|---:|---:|---:|---:|---:|---|"]
    replay = server.get("replay") or {}
    above = "next rate up" if server["rate_qps"] is not None else "a trickle"
    for name, rate, p99 in (("answer", server["rate_qps"], server["p99_s"]),
                            (above, server["next_rate_qps"], server["next_p99_s"])):
        if rate is None:
            continue
        served = replay.get("answer" if name == "answer" else "next")
        if served:
            live = f"{_ms(served['p99_s'])} | {served['queries']:,} | {served['mean_batch']:.2f} | " \
                   f"{'yes' if served['budget_met'] else 'no'}"
        else:
            live = f"- | - | - | {'yes' if p99 <= budget_ms / 1e3 else 'no'} (simulated)"
        lines.append(f"| {name} | {rate:,.1f} | {_ms(p99)} | {live} |")
    if server.get("step") is not None:
        share = f", the answer at {server['capacity_share']:.2f} of it" if server["rate_qps"] is not None else ""
        lines += ["", f"Rates tried {100 * server['step']:.3g}% apart around the capacity of "
                      f"{server['capacity_qps']:,.1f} queries/s{share}; service times measured in the serving loop."]
    if replay:
        lines += ["", f"Live replay {'agrees' if replay['agrees'] else 'disagrees'} with the search."]
    return lines + [""]


def _run_markdown(run_dir: Path, record: dict[str, Any]) -> list[str]:
    lines = [f"## {record['run_id']}", "",
             f"{record['exp']} ({record['model']}) on {record['device']}, {record['replicas']} replica(s), "
             f"amp={record['amp']}, scenario={record['scenario']}, budget {record['latency_budget_ms']:g} ms p99", ""]
    if record.get("status") != "completed":
        lines += [f"**{record.get('status')}**: {record.get('error', '')}; batch sizes finished: "
                  f"{record.get('finished_batch_sizes', [])}", ""]
    if (run_dir / PLOT).is_file() or record.get("batches"):
        lines += [f"![latency against throughput]({(run_dir / PLOT).as_posix()})", ""]
    lines += ["| batch | queries | p50 ms | p90 ms | p99 ms | max ms | samples/s | from | weights MiB "
              "| activations MiB | peak MiB | bound | memory-bound share |",
              "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    for p in sorted(record.get("batches", []), key=lambda p: p["batch_size"]):
        lat, mem = p["latency_s"] or {}, p["memory"]
        share = f"{100 * p['memory_frac']:.0f}%" if p.get("memory_frac") is not None else "-"
        lines.append(f"| {p['batch_size']} | {p['queries'] or '-'} | {_ms(lat.get('p50'))} | {_ms(lat.get('p90'))} | "
                     f"{_ms(lat.get('p99'))} | {_ms(lat.get('max'))} | {p['samples_per_s']:,.1f} | "
                     f"{p['samples_per_s_from'].replace('_', ' ')} | "
                     f"{mem['weights'] / MIB:.2f} | {mem['activations'] / MIB:.2f} | {mem['peak'] / MIB:.2f} | "
                     f"{p.get('compute_bound') or '-'} | {share} |")
    lines.append("")
    if record.get("server"):
        lines += _server_markdown(record["server"], record["latency_budget_ms"])
    lines += [*[f"- {line}" for line in record.get("findings", [])], ""]
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
            if record.get("batches"):
                plot.draw(record, run_dir / PLOT)
            markdown += _run_markdown(run_dir, record)
            status = record.get("status")
            status = "" if status == "completed" else f" {status}: {record.get('error', '')}"
            console += [f"{run_dir.name}:{status}", *[f"  {line}" for line in record.get("findings", [])]]
    (out / "report.md").write_text("\n".join(markdown))
    return "\n".join([*console, "", f"  report: {out / 'report.md'}"])
