"""Cross-rank reduction of step metrics, and the summary of a run.

Each rank keeps its own per-step values; at log intervals they are gathered
once (one collective for many steps, never one per step), by a thread of each
rank on a group of its own (``scaling.train.recorder``), off the training path. For every key the
record holds the mean over ranks and ``<key>_max`` / ``<key>_min``, plus
``slowest_rank`` and ``samples_per_s`` (global batch / the largest ``step_s``).

Two values need every rank's numbers and are made here, at the reduction:
``comm_wait_s`` (per rank: its exposed communication minus the smallest
exposed communication of any rank in that step, i.e. the time it waited in a
collective for a slower rank) and ``slowest_rank`` (the rank with the most
time of its own in the step, ``step_s − comm_wait_s``: the one the others
waited for; in a synchronised step every rank's ``step_s`` is about equal, so
``step_s`` alone would name a rank at random); ``own_step_s`` is that time of
its own, per rank, so that ``own_step_s_max - own_step_s_min`` is the step's skew.
Whether the waiting is one straggler or ranks taking turns is decided in
``scaling.records.waiting``.

The summary's shares are shares of the total measured time (each part summed
over the measured steps, divided by the summed ``step_s``), so that a stall on
one step in five counts for what it costs. ``comm_wait_frac`` (mean over
ranks) is the part of ``comm_exposed_frac`` spent waiting; the verdict weighs
the waiting by ``comm_wait_max_frac``, that of the rank that waited most: when
one rank of two stalls 60 ms in data loading, the mean data share and the mean
waiting share are both about half the stall, but the cause is one slow rank,
which the waiting rank sees whole.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from scaling.records import waiting
from scaling.records.schema import CROSS_RANK_KEYS, SHARES, verdict



def derive(metrics: dict[str, float]) -> dict[str, float]:
    """Add ``compute_s`` (step minus data, exposed communication and other)."""
    metrics["compute_s"] = max(
        0.0, metrics["step_s"] - metrics["data_s"] - metrics.get("comm_exposed_s", 0.0) - metrics["other_s"]
    )
    return metrics


def with_cross_rank(per_rank: np.ndarray, keys: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """``per_rank[r, s, k]`` with ``comm_wait_s`` and ``own_step_s`` appended when the run communicates."""
    keys = tuple(keys)
    if "comm_exposed_s" not in keys:
        return per_rank, keys
    exposed = per_rank[:, :, keys.index("comm_exposed_s")]
    wait = exposed - exposed.min(axis=0, keepdims=True)
    own = per_rank[:, :, keys.index("step_s")] - wait
    return np.concatenate([per_rank, wait[:, :, None], own[:, :, None]], axis=2), keys + CROSS_RANK_KEYS


def own_time(per_rank: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    """``[r, s]``: each rank's step time less its waiting for others."""
    own = per_rank[:, :, keys.index("step_s")]
    if "comm_wait_s" in keys:
        own = own - per_rank[:, :, keys.index("comm_wait_s")]
    return own


def reduce_ranks(per_rank: np.ndarray, keys: Sequence[str], steps: Sequence[int], global_batch: int,
                 nulls: Sequence[str] = ()) -> list[dict[str, Any]]:
    """``per_rank[r, s, k]`` (``keys`` as measured by each rank) -> one record per step."""
    values_all, keys = with_cross_rank(np.asarray(per_rank, dtype=float), keys)
    own = own_time(values_all, keys)
    step_col = keys.index("step_s")
    # Over the ranks at once ([step, key]): the cost grows with the ranks only inside numpy.
    means, maxima, minima = (values_all.mean(axis=0).tolist(), values_all.max(axis=0).tolist(),
                             values_all.min(axis=0).tolist())
    slowest_ranks = own.argmax(axis=0).tolist() if len(steps) else []
    names = [(key, f"{key}_max", f"{key}_min") for key in keys]
    records = []
    for s, step in enumerate(steps):
        record: dict[str, Any] = {"step": int(step)}
        for (key, key_max, key_min), mean, high, low in zip(names, means[s], maxima[s], minima[s]):
            record[key] = mean
            record[key_max] = high
            record[key_min] = low
        for key in nulls:
            record[key] = None
        record["slowest_rank"] = int(slowest_ranks[s])
        slowest = maxima[s][step_col]
        record["samples_per_s"] = global_batch / slowest if slowest > 0 else 0.0
        records.append(record)
    return records


def reduce_steps(per_rank: np.ndarray, keys: Sequence[str], steps: Sequence[int], global_batch: int,
                 nulls: Sequence[str] = ()) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """The reduction of gathered steps, as the loop and the failure path both make it: one record per step,
    and per key each rank's sum over these steps."""
    return reduce_ranks(per_rank, keys, steps, global_batch, nulls), rank_totals(per_rank, keys)


def rank_totals(per_rank: np.ndarray, keys: Sequence[str]) -> dict[str, list[float]]:
    """Per key, each rank's sum over the given steps (for naming where a straggler lost its time)."""
    values, keys = with_cross_rank(np.asarray(per_rank, dtype=float), keys)
    sums = values.sum(axis=1)
    return {key: [float(v) for v in sums[:, k]] for k, key in enumerate(keys)}


def add_totals(total: dict[str, list[float]], more: dict[str, list[float]]) -> dict[str, list[float]]:
    for key, values in more.items():
        total[key] = [a + b for a, b in zip(total[key], values)] if key in total else list(values)
    return total


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def _median(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(records: Sequence[dict[str, Any]], keys: Sequence[str], nulls: Sequence[str] = (),
              totals: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Medians over measured steps, step_s percentiles, shares of the total time and the verdict.

    ``totals`` (per key, per rank sums over the same steps) lets the summary
    name where the slowest rank lost its time.
    """
    if not records:
        return {}
    keys = tuple(keys) + (CROSS_RANK_KEYS if "comm_exposed_s" in keys else ())
    summary: dict[str, Any] = {key: _median(records, key) for key in keys}
    summary.update({key: None for key in nulls})
    summary["samples_per_s"] = statistics.median(r["samples_per_s"] for r in records)
    step_times = [r["step_s"] for r in records]
    summary["step_s_p05"] = percentile(step_times, 5)
    summary["step_s_p95"] = percentile(step_times, 95)
    summary["steps"] = len(records)
    if "compute_s" not in keys:
        return summary
    total = sum(step_times)
    for name, key in (*((n, f"{n}_s") for n in SHARES), ("comm_wait", "comm_wait_s"),
                      ("comm_wait_max", "comm_wait_s_max")):
        if key.removesuffix("_max") in keys:
            part = sum(r[key] for r in records)
            summary[f"{name}_frac"] = part / total if total > 0 else 0.0
        else:
            summary[f"{name}_frac"] = 0.0 if name == "comm_exposed" else None
    summary["waiting"] = waiting.decide(records, totals, summary.get("comm_wait_max_frac"))
    summary["straggler"] = waiting.straggler(summary["waiting"])
    summary["bound"] = verdict(summary)
    return summary
