"""The keys of ``infer.json`` and the one percentile rule; plain Python (no torch), read by the report.

    <paths.root>/<study.name>/<run_id>/
      config.yaml              the resolved config
      infer.json               the sweep (below)
      latency_throughput.png   samples/s against p99 latency, one point per batch size

``infer.json``: ``status`` (``running`` from the start, then ``completed`` or
``failed`` with ``error``, ``failed_at`` and ``finished_batch_sizes``: the
batch sizes every replica finished, kept in ``batches``), ``run_id``, ``exp``,
``model``, ``device``, ``amp``, ``threads_per_process``, ``replicas``,
``scenario``, ``latency_budget_ms``, ``hardware`` (the roofline ceilings),
``batches`` (the node: every replica's samples pooled, throughput summed),
``per_replica`` (each replica's own ``batches``, with its per-query
``latency_samples_s`` and, for the server scenario, ``server_service_s`` and
``server_issue_lag_s``: each batch's service time in the serving loop and the
generator's lateness, what the search simulates on), ``server`` and
``findings``.

Per batch size: ``batch_size``; single stream (null when the scenario is
offline alone): ``queries``, ``latency_s`` (``p50``, ``p90``, ``p99``,
``max``), ``single_stream_samples_per_s``; ``offline`` (null unless offline
ran): ``queries``, ``batch_size``, ``total_s``, ``samples_per_s``;
``samples_per_s`` (offline's where it ran, else single stream's) and
``samples_per_s_from``; ``memory`` (``weights``, ``activations``, ``peak``:
bytes), ``compute_bound``, ``memory_frac``, ``arithmetic_frac``.

``server`` (replica 0's, simulated on its service times): ``max_batch``,
``timeout_ms``, ``queries``, ``seed``, ``step`` (rates tried are
``capacity_qps x (1 + step)**k``), ``rate_qps`` and ``p99_s`` (the largest
rate within the budget), ``capacity_share`` (``rate_qps / capacity_qps``),
``next_rate_qps`` and ``next_p99_s`` (the next rate up, which misses it),
``mean_batch``, ``capacity_qps``, ``replicas_rate_qps``, ``node_rate_qps``;
``replay`` (null when not replayed): ``answer`` and ``next``, each served live
(``scaling.infer.live``: ``rate_qps``, ``queries``, ``p50_s``, ``p99_s``,
``max_s``, ``mean_batch``, ``budget_met``, ``issue_lag_p99_s``,
``duration_s``, ``service_s``), and ``agrees`` (the answer meets the
budget live and the next rate up does not); with replicas,
``replicas_replay_agrees`` (each replica's ``agrees``, null where it had no
rate to replay).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INFER_JSON = "infer.json"
PLOT = "latency_throughput.png"
PERCENTILES = (50, 90, 99)


def latency_summary(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 (numpy's linear interpolation between order statistics) and max, in seconds."""
    values = np.asarray(samples_s, dtype=float)
    out = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    out["max"] = float(values.max())
    return out
