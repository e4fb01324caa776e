"""Arithmetic-, memory- or communication-bound: the kind of each operator against the measured ceilings.

Plain Python (no torch), so that the training job, the console and the report
share one definition. The roofline model (Williams, Waterman & Patterson,
CACM 2009): an operator of arithmetic intensity ``I`` (FLOP per byte moved)
can reach at most ``min(peak FLOP/s, I x peak B/s)``; below the ridge point
``peak FLOP/s / peak B/s`` memory bandwidth limits it, above it arithmetic.

``ops.json`` rows (one per operator and pass) carry ``op``, ``pass``, ``calls``,
``time_s``, ``flops``, ``bytes``, ``intensity``, ``achieved_flops_per_s``,
``achieved_Bps``, ``precision``, ``peak_flops_per_s`` (the ceiling of that
precision), ``flops_from`` and ``kind``:

- ``arithmetic``     intensity >= ridge of its precision
- ``memory``         below it, zero-FLOP operators that move bytes included
- ``communication``  collectives (their CPU time is the launch, not the transfer)
- ``other``          neither FLOPs nor bytes (views, allocations)

Summary keys: ``arithmetic_frac`` and ``memory_frac`` (shares of the operators'
time in forward, backward and optimizer) and ``compute_bound``
(``arithmetic|memory``: the larger of the two).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

PASSES = ("forward", "backward", "optimizer")
KINDS = ("arithmetic", "memory", "communication", "other")
COMM_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "gloo", "nccl")

# Operator families as a reader names them; the first match wins.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matrix products", ("mm", "addmm", "bmm", "baddbmm", "matmul", "_scaled_mm", "addmv", "mv", "dot")),
    ("convolutions", ("convolution", "convolution_backward", "_convolution", "mkldnn_convolution",
                      "cudnn_convolution", "_slow_conv2d_forward", "_slow_conv2d_backward")),
    ("attention", ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
                   "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
                   "_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_flash_attention_for_cpu_backward")),
    ("batch norm", ("native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
                    "_native_batch_norm_legit_functional", "cudnn_batch_norm", "cudnn_batch_norm_backward",
                    "miopen_batch_norm", "_batch_norm_with_update", "batch_norm_backward")),
    ("layer norm", ("native_layer_norm", "native_layer_norm_backward")),
    ("ReLU", ("relu", "relu_", "threshold_backward", "clamp_min", "clamp_min_")),
    ("GELU", ("gelu", "gelu_backward")),
    ("softmax", ("_softmax", "_softmax_backward_data", "_log_softmax", "_log_softmax_backward_data")),
    ("loss", ("nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward")),
    ("pooling", ("max_pool2d_with_indices", "max_pool2d_with_indices_backward", "avg_pool2d",
                 "avg_pool2d_backward", "_adaptive_avg_pool2d", "_adaptive_avg_pool2d_backward", "mean")),
    ("embedding", ("embedding", "embedding_dense_backward", "index_select", "index_add_")),
    ("add", ("add", "add_", "sub", "sub_", "rsub")),
    ("multiply", ("mul", "mul_", "div", "div_", "addcmul_", "addcdiv_", "lerp_")),
    ("sums", ("sum", "sum_")),
    ("copies", ("copy_", "clone", "_to_copy", "cat", "contiguous", "fill_", "zero_")),
)
_FAMILY_OF = {name: family for family, names in FAMILIES for name in names}


def short_name(op: str) -> str:
    """``aten::addmm`` -> ``addmm``."""
    return op.split("::", 1)[-1]


def family(op: str) -> str:
    """The family a reader would name (``matrix products``, ``ReLU``), else the operator's own name."""
    name = short_name(op)
    if name in _FAMILY_OF:
        return _FAMILY_OF[name]
    if name.startswith("_foreach_") or name.startswith("_fused_"):
        return "optimizer update"
    return name


def is_communication(op: str) -> bool:
    namespace = op.split("::", 1)[0] if "::" in op else ""
    return namespace in COMM_NAMESPACES or any(word in op for word in ("allreduce", "all_reduce", "broadcast_",
                                                                      "allgather", "reduce_scatter"))


def ridge(peak_flops_per_s: float, peak_Bps: float) -> float:
    """FLOP per byte where the memory roof meets the arithmetic one."""
    return peak_flops_per_s / peak_Bps


def kind_of(op: str, flops: float, nbytes: float, peak_flops_per_s: float, peak_Bps: float) -> str:
    if is_communication(op):
        return "communication"
    if nbytes <= 0:
        return "other"
    return "arithmetic" if flops / nbytes >= ridge(peak_flops_per_s, peak_Bps) else "memory"


def finish_row(row: dict[str, Any], peaks: Mapping[str, float], peak_Bps: float) -> dict[str, Any]:
    """Add intensity, achieved rates, the ceiling of the row's precision and its kind."""
    peak = peaks.get(row.get("precision") or "", max(peaks.values()))
    time_s, flops, nbytes = row["time_s"], row["flops"], row["bytes"]
    row["intensity"] = flops / nbytes if nbytes > 0 else None
    row["achieved_flops_per_s"] = flops / time_s if time_s > 0 else None
    row["achieved_Bps"] = nbytes / time_s if time_s > 0 else None
    row["peak_flops_per_s"] = peak
    row["kind"] = kind_of(row["op"], flops, nbytes, peak, peak_Bps)
    return row


def time_by_kind(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    totals = dict.fromkeys(KINDS, 0.0)
    for row in rows:
        totals[row["kind"]] += row["time_s"]
    return totals


def summarize(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``arithmetic_frac``, ``memory_frac`` (shares of the operators' time) and ``compute_bound``."""
    totals = time_by_kind(rows)
    total = sum(totals.values())
    if total <= 0:
        return {"arithmetic_frac": None, "memory_frac": None, "compute_bound": None}
    arithmetic, memory = totals["arithmetic"] / total, totals["memory"] / total
    return {"arithmetic_frac": arithmetic, "memory_frac": memory,
            "compute_bound": "arithmetic" if arithmetic >= memory else "memory"}


def effective_peak(rows: Iterable[Mapping[str, Any]], counted_only: bool = True) -> float | None:
    """The FLOP/s the operators' FLOPs could reach, each at the peak of its own precision.

    ``sum(flops) / sum(flops / peak)``: a model whose convolutions run in TF32
    and matrix products in full fp32 is held against the mix, not against the
    higher of the two. ``counted_only``: the FLOP counter's operators (matrix
    products, convolutions, attention), the FLOPs that MFU counts.
    """
    flops = seconds = 0.0
    for row in rows:
        if counted_only and row.get("flops_from") != "flop_counter":
            continue
        if row["flops"] > 0 and row.get("peak_flops_per_s"):
            flops += row["flops"]
            seconds += row["flops"] / row["peak_flops_per_s"]
    return flops / seconds if seconds > 0 else None


def groups(rows: Iterable[Mapping[str, Any]], kind: str) -> list[tuple[str, float]]:
    """(family, time_s) of the operators of one kind, largest first."""
    by_family: dict[str, float] = {}
    for row in rows:
        if row["kind"] == kind:
            by_family[family(row["op"])] = by_family.get(family(row["op"]), 0.0) + row["time_s"]
    return sorted(by_family.items(), key=lambda item: -item[1])


def _names(families: list[tuple[str, float]], most: int = 3) -> str:
    names = [name for name, _ in families[:most]]
    if len(families) > most:
        names.append("others")
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def compute_clause(rows: list[Mapping[str, Any]], peak_Bps: float) -> str | None:
    """What the compute part of a step is bound by, with the figures that show it.

    ``compute-bound, and within compute memory-bound: ReLU, add and copies are
    58% of compute at 11 GB/s (61% of the measured 18 GB/s); matrix products
    42% at 48% of the measured peak``: the first part is the caller's.
    """
    summary = summarize(rows)
    if summary["compute_bound"] is None:
        return None
    total = sum(row["time_s"] for row in rows)
    parts = {}
    memory_rows = [r for r in rows if r["kind"] == "memory"]
    if memory_rows:
        seconds = sum(r["time_s"] for r in memory_rows)
        rate = sum(r["bytes"] for r in memory_rows) / seconds if seconds > 0 else 0.0
        parts["memory"] = (f"{_names(groups(rows, 'memory'))} {'is' if len(groups(rows, 'memory')) == 1 else 'are'} "
                           f"{100 * seconds / total:.0f}% of compute at {rate / 1e9:.1f} GB/s "
                           f"({100 * rate / peak_Bps:.0f}% of the measured {peak_Bps / 1e9:.1f} GB/s)")
    arithmetic_rows = [r for r in rows if r["kind"] == "arithmetic"]
    if arithmetic_rows:
        seconds = sum(r["time_s"] for r in arithmetic_rows)
        rate = sum(r["flops"] for r in arithmetic_rows) / seconds if seconds > 0 else 0.0
        peak = effective_peak(arithmetic_rows, counted_only=False) or 0.0
        parts["arithmetic"] = (f"{_names(groups(rows, 'arithmetic'))} {100 * seconds / total:.0f}% at "
                               f"{rate / 1e9:.1f} GFLOP/s ({100 * rate / peak:.0f}% of the measured peak "
                               f"{peak / 1e9:.1f} GFLOP/s)" if peak > 0 else "")
    first = summary["compute_bound"]
    second = "arithmetic" if first == "memory" else "memory"
    text = f"within compute {first}-bound: {parts.get(first, '')}"
    if parts.get(second):
        text += f"; {parts[second]}"
    return text
