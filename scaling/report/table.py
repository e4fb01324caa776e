"""results.csv: one row per run (SPEC "Scaling definitions"), failed runs included."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaling.report.commbench import Bench, per_run
from scaling.report.metrics import StudyStats

COLUMNS = (
    "study", "kind", "world_size", "nodes", "batch_size_per_rank", "global_batch_size", "repeat",
    "step_s", "samples_per_s", "speedup", "efficiency",
    "compute_frac", "comm_exposed_frac", "data_frac", "other_frac",
    "comm_s", "comm_exposed_s", "overlap", "busbw_GBps", "peak_memory_bytes", "rss_peak_bytes",
    "bound", "run_id", "status", "threads_per_process", "measured_steps", "error",
    "mean_bucket_bytes", "commbench_busbw_GBps", "busbw_vs_commbench", "commbench",
)
"""``step_s`` is the run's median step; ``speedup`` of a weak study is the scaled speedup
(efficiency * N / b); ``peak_memory_bytes`` is run.json's memory.max.peak (max over ranks).
The last four are filled with ``--commbench`` where a result of the run's world size and
backend was given: ``mean_bucket_bytes`` = comm_bytes / comm_buckets, ``commbench_busbw_GBps``
commbench's all-reduce bus bandwidth at that size (fitted model), ``busbw_vs_commbench`` =
busbw_GBps / commbench_busbw_GBps, ``commbench`` the commbench.json used."""


def rows(studies: list[StudyStats], benches: Sequence[Bench] = ()) -> list[dict[str, Any]]:
    out = []
    for stats in studies:
        for run in sorted(stats.records.runs, key=lambda r: (r.world_size, r.repeat or 0, r.run_id)):
            s = run.summary if run.completed else {}
            versus = per_run(run, benches) if benches else None
            out.append({
                "study": stats.name,
                "kind": stats.kind,
                "world_size": run.world_size,
                "nodes": run.nodes,
                "batch_size_per_rank": run.batch_per_rank,
                "global_batch_size": run.global_batch,
                "repeat": run.repeat,
                "step_s": s.get("step_s"),
                "samples_per_s": s.get("samples_per_s"),
                "speedup": stats.run_speedup.get(run.run_id),
                "efficiency": stats.run_efficiency.get(run.run_id),
                **{f"{name}_frac": s.get(f"{name}_frac") for name in ("compute", "comm_exposed", "data", "other")},
                "comm_s": s.get("comm_s"),
                "comm_exposed_s": s.get("comm_exposed_s"),
                "overlap": s.get("overlap"),
                "busbw_GBps": s.get("busbw_GBps"),
                "peak_memory_bytes": run.memory_max.get("peak") if run.completed else None,
                "rss_peak_bytes": run.memory_max.get("rss_peak") if run.completed else None,
                "bound": s.get("bound"),
                "run_id": run.run_id,
                "status": run.status,
                "threads_per_process": run.threads_per_process,
                "measured_steps": run.measured_steps,
                "error": run.error,
                "mean_bucket_bytes": versus[1].bucket_bytes if versus else None,
                "commbench_busbw_GBps": versus[1].reference_GBps if versus else None,
                "busbw_vs_commbench": versus[1].fraction if versus else None,
                "commbench": str(versus[0].path) if versus else None,
            })
        for point in stats.records.missing_points:
            out.append({"study": stats.name, "kind": stats.kind, "world_size": point.get("world_size"),
                        "repeat": point.get("repeat"), "run_id": point.get("run_id"), "status": "failed",
                        "measured_steps": 0, "error": point.get("error") or "failed before writing records"})
    return out


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if row.get(k) is None else _fmt(row.get(k))) for k in COLUMNS})


def _fmt(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value
