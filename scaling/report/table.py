"""results.csv: one row per run (docs/contract.md, "Scaling"), failed runs included."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaling.report.commbench_share import Bench, per_run
from scaling.report.metrics import StudyStats
from scaling.report.study_folder import RunRecord
from scaling.report.waterfall import TERMS, column
from scaling.records.schema import COMM_KINDS, SHARE_FRACS, keys_of_kinds

KIND_COLUMNS = keys_of_kinds(COMM_KINDS)
"""The per-kind keys of every strategy's records, under their own names."""
COLUMNS = (
    "study", "kind", "world_size", "nodes", "batch_size_per_rank", "global_batch_size", "repeat",
    "step_s", "samples_per_s", "speedup", "efficiency",
    *SHARE_FRACS,
    "comm_s", "comm_exposed_s", "overlap", "busbw_GBps", "peak_memory_bytes", "rss_peak_bytes",
    "bound", "arithmetic_frac", "memory_frac", "compute_bound", "run_id", "status", "threads_per_process", "measured_steps", "error",
    "mean_bucket_bytes", "commbench_busbw_GBps", "busbw_vs_commbench", "commbench",
    "role", "world_step_s", "ideal_step_s", *(column(t) for t in TERMS), "loss_unsplit_s",
    "strategy", "model_state_bytes", "predicted_model_state_bytes",
    *KIND_COLUMNS,
    "waiting", "straggler_rank", "straggler_phase", "last_arrival_p", "waiting_explained", "own_spread_s",
)
"""``step_s`` is the run's median step; ``speedup`` of a weak study is the scaled speedup
(efficiency * N / b); ``peak_memory_bytes`` is run.json's memory.max.peak (max over ranks).
The last four are filled with ``--commbench`` where a result of the run's world size and
backend was given: ``mean_bucket_bytes`` = comm_wire_bytes / comm_buckets (bytes sent per all-reduce call), ``commbench_busbw_GBps``
commbench's all-reduce bus bandwidth at that size (fitted model), ``busbw_vs_commbench`` =
busbw_GBps / commbench_busbw_GBps, ``commbench`` the commbench.json used.
``arithmetic_frac``, ``memory_frac`` and ``compute_bound`` come from the op profile (instrument.ops).
``busbw_GBps`` is that of the bytes really sent (comm_wire_bytes; for records older than it, corrected
for the fp16/bf16 hooks); empty at world size 1, which has no peer.
``role``: ``point`` (a world size of the study) or ``control`` (solo-b<B>: one process at per-rank batch B,
no peer; not a point of the scaling curve, so no speedup or efficiency).
The loss columns (scaling.report.waterfall) are those of the run's world size, medians over its repeats:
``world_step_s`` = T(N), ``ideal_step_s`` = T_ideal(N), and ``loss_*_s`` the terms, which add up to
``world_step_s - ideal_step_s``; a term whose control is missing is empty and ``loss_unsplit_s`` holds
what the empty ones add up to.
``strategy`` is run.json's dist.strategy (as asked; world size 1 trains unwrapped whatever it is);
``model_state_bytes`` memory.max.model_state (parameters, gradients and optimizer state of the largest rank),
``predicted_model_state_bytes`` run.json memory_model.max.model_state; ``comm_<kind>_s``, ``_exposed_s``,
``_bytes`` the run's median per step of each kind of collective its strategy issues (all-reduce; FSDP's
all-gathers in forward and backward and reduce-scatter; ZeRO-1's broadcast), empty for the kinds it does not.
``waiting`` is ``straggler`` (one rank is late significantly more often than chance and its excess explains
the others' waiting) or ``skew`` (the ranks take turns), empty without peers; ``straggler_rank`` and
``straggler_phase`` the named rank and where it lost its time; ``last_arrival_p`` the test's p-value (the most
frequent last arrival against 1/N, Bonferroni over the ranks), ``waiting_explained`` the share of the others'
waiting that rank's excess explains, ``own_spread_s`` the median per step of the slowest rank's own time less
the fastest's (scaling.records.waiting)."""


def rows(studies: list[StudyStats], benches: Sequence[Bench] = ()) -> list[dict[str, Any]]:
    out = []
    for stats in studies:
        runs = sorted(stats.records.runs, key=lambda r: (r.world_size, r.repeat or 0, r.run_id))
        controls = sorted(stats.records.controls, key=lambda r: (r.solo_batch or 0, r.repeat or 0, r.run_id))
        for run in [*runs, *controls]:
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
                **{key: s.get(key) for key in SHARE_FRACS},
                "comm_s": s.get("comm_s"),
                "comm_exposed_s": s.get("comm_exposed_s"),
                "overlap": s.get("overlap"),
                "busbw_GBps": run.busbw_GBps() if run.completed else None,
                "peak_memory_bytes": run.memory_max.get("peak") if run.completed else None,
                "rss_peak_bytes": run.memory_max.get("rss_peak") if run.completed else None,
                "bound": s.get("bound"),
                **{key: s.get(key) for key in ("arithmetic_frac", "memory_frac", "compute_bound")},
                "run_id": run.run_id,
                "status": run.status,
                "threads_per_process": run.threads_per_process,
                "measured_steps": run.measured_steps,
                "error": run.error,
                "mean_bucket_bytes": versus[1].bucket_bytes if versus else None,
                "commbench_busbw_GBps": versus[1].reference_GBps if versus else None,
                "busbw_vs_commbench": versus[1].fraction if versus else None,
                "commbench": str(versus[0].path) if versus else None,
                "role": "control" if run.is_control else "point",
                **loss_columns(stats, run),
                "strategy": run.strategy,
                "model_state_bytes": run.model_state_bytes() if run.completed else None,
                "predicted_model_state_bytes": run.predicted_model_state_bytes(),
                **{key: s.get(key) for key in KIND_COLUMNS},
                **waiting_columns(s),
            })
        for point in stats.records.missing_points:
            control = point.get("solo_batch") is not None
            out.append({"study": stats.name, "kind": stats.kind, "world_size": point.get("world_size"),
                        "batch_size_per_rank": point.get("solo_batch"), "role": "control" if control else "point",
                        "repeat": point.get("repeat"), "run_id": point.get("run_id"), "status": "failed",
                        "measured_steps": 0, "error": point.get("error") or "failed before writing records"})
    return out


def waiting_columns(summary: dict[str, Any]) -> dict[str, Any]:
    waiting, named = summary.get("waiting") or {}, summary.get("straggler") or {}
    if not waiting:
        return {}
    return {"waiting": waiting.get("kind"), "straggler_rank": named.get("rank"), "straggler_phase": named.get("phase"),
            "last_arrival_p": waiting.get("p_value"), "waiting_explained": waiting.get("explained"),
            "own_spread_s": waiting.get("own_spread_s")}


def loss_columns(stats: StudyStats, run: RunRecord) -> dict[str, Any]:
    if run.is_control or not run.completed or stats.waterfall is None:
        return {}
    size = stats.waterfall.size(run.world_size)
    return size.columns() if size is not None else {}


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if row.get(k) is None else _fmt(row.get(k))) for k in COLUMNS})


def _fmt(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value
