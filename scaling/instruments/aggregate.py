"""Cross-rank reduction of step metrics, and the summary of a run.

Each rank keeps its own per-step values; at log intervals they are gathered
once (one collective for many steps, never one per step). For every key the
record holds the mean over ranks and ``<key>_max`` / ``<key>_min``, plus
``slowest_rank`` (the rank with the largest ``step_s``) and ``samples_per_s``
(global batch / the slowest rank's ``step_s``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

STEP_KEYS = (
    "step_s", "data_s", "forward_s", "backward_s", "optimizer_s", "other_s",
    "comm_s", "comm_exposed_s", "compute_s", "overlap", "comm_bytes", "comm_buckets", "algbw_GBps", "busbw_GBps",
)
BARE_KEYS = ("step_s",)
SHARES = ("compute", "comm_exposed", "data", "other")


def derive(metrics: dict[str, float]) -> dict[str, float]:
    """Add ``compute_s`` (step minus data, exposed communication and other)."""
    metrics["compute_s"] = max(
        0.0, metrics["step_s"] - metrics["data_s"] - metrics["comm_exposed_s"] - metrics["other_s"]
    )
    return metrics


def reduce_ranks(per_rank: np.ndarray, keys: Sequence[str], steps: Sequence[int], global_batch: int) -> list[dict[str, Any]]:
    """``per_rank[r, s, k]`` -> one record per step with mean/max/min over ranks."""
    records = []
    step_col = keys.index("step_s")
    for s, step in enumerate(steps):
        values = per_rank[:, s, :]
        record: dict[str, Any] = {"step": int(step)}
        for k, key in enumerate(keys):
            column = values[:, k]
            record[key] = float(column.mean())
            record[f"{key}_max"] = float(column.max())
            record[f"{key}_min"] = float(column.min())
        record["slowest_rank"] = int(values[:, step_col].argmax())
        slowest = record["step_s_max"]
        record["samples_per_s"] = global_batch / slowest if slowest > 0 else 0.0
        records.append(record)
    return records


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(records: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Medians over measured steps, step_s percentiles, shares and the verdict."""
    if not records:
        return {}
    summary: dict[str, Any] = {key: statistics.median(r[key] for r in records) for key in keys}
    summary["samples_per_s"] = statistics.median(r["samples_per_s"] for r in records)
    step_times = [r["step_s"] for r in records]
    summary["step_s_p05"] = percentile(step_times, 5)
    summary["step_s_p95"] = percentile(step_times, 95)
    summary["steps"] = len(records)
    if "compute_s" not in summary:
        return summary
    # Shares of the median step: the medians of the four parts, normalised so
    # that they sum to 1 (medians of parts need not add up to the median step).
    parts = {name: summary[f"{name}_s"] for name in SHARES}
    total = sum(parts.values())
    for name, value in parts.items():
        summary[f"{name}_frac"] = value / total if total > 0 else 0.0
    summary["bound"] = verdict(summary)
    return summary


def verdict(summary: dict[str, Any]) -> str:
    """communication when exposed communication is the largest share, data when data is, else compute."""
    shares = {name: summary[f"{name}_frac"] for name in SHARES}
    largest = max(shares, key=shares.get)
    return {"comm_exposed": "communication", "data": "data"}.get(largest, "compute")
