"""The keys of ``infer.json`` and the one percentile rule; plain Python (no torch), read by the report.

    <paths.root>/<study.name>/<run_id>/
      config.yaml              the resolved config
      infer.json               the sweep (below)
      latency_throughput.png   samples/s against p99 latency, one point per batch size

``infer.json``: ``status``, ``run_id``, ``exp``, ``model``, ``device``, ``amp``,
``threads_per_process``, ``replicas``, ``scenario``, ``latency_budget_ms``,
``hardware`` (the roofline ceilings), ``batches`` (the node: every replica's
samples pooled, throughput summed), ``per_replica`` (each replica's own
``batches``, with its per-query ``latency_samples_s``), ``server`` and
``findings``. Per batch size: ``batch_size``, ``queries``, ``latency_s``
(``p50``, ``p90``, ``p99``, ``max``), ``samples_per_s``, ``memory``
(``weights``, ``activations``, ``peak``: bytes), ``compute_bound``,
``memory_frac``, ``arithmetic_frac``.
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
