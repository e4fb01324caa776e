"""The record schema: what every key of ``steps.jsonl`` and ``run.json`` means.

The one table that the training job (which writes the records) and the console,
the report and wandb (which read them) share, so that a metric is defined once.
Plain Python: importing it never imports torch.

- ``STEP_METRICS``: each step key with its unit and meaning (SPEC "What each
  number means"); ``steps.jsonl`` holds each as the mean over ranks plus
  ``<key>_max`` / ``<key>_min``.
- ``SHARES`` and ``SHARE_LABELS``: the four parts of a step, whose
  ``<part>_frac`` in the summary add up to 1.
- ``COMM_KINDS``, ``STRATEGY_KINDS``, ``kind_keys()``: per kind of collective (all-reduce, FSDP's
  all-gathers and reduce-scatter, ZeRO-1's broadcast) its busy, exposed time and bytes.
- ``MEMORY_KEYS``, ``MEMORY_CATEGORIES``, ``MEMORY_LABELS``: run.json ``memory``.
- ``verdict()``: the summary's ``bound``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str
    unit: str
    meaning: str


STEP_METRICS = (
    Metric("step_s", "s", "wall time of one optimizer step, end of the previous step to end of this one"),
    Metric("data_s", "s", "waiting for the next batch, host-to-device copy included"),
    Metric("forward_s", "s", "forward pass and loss"),
    Metric("backward_s", "s", "loss.backward() until every gradient bucket's all-reduce has completed"),
    Metric("optimizer_s", "s", "optimizer.step() and zero_grad()"),
    Metric("other_s", "s", "step_s - data_s - forward_s - backward_s - optimizer_s: framework overhead"),
    Metric("compute_s", "s", "step_s - data_s - comm_exposed_s - other_s"),
    Metric("comm_s", "s", "busy time of the gradient all-reduce: the union of its buckets' [launch, completion]"),
    Metric("comm_exposed_s", "s", "communication on the critical path, after backward's last bucket was ready"),
    Metric("comm_sync_s", "s", "collectives on the critical path outside the gradient hook (buffer broadcast)"),
    Metric("overlap", "0..1", "1 - comm_exposed_s / comm_s: the hidden share of communication"),
    Metric("comm_bytes", "bytes", "bytes handed to the step's collectives (DDP: gradient bytes all-reduced)"),
    Metric("comm_wire_bytes", "bytes", "bytes the hook actually sent (less than comm_bytes for compressing hooks)"),
    Metric("comm_buckets", "count", "gradient collectives in the step (DDP buckets all-reduced, FSDP reduce-scatters)"),
    Metric("algbw_GBps", "1e9 B/s", "comm_wire_bytes / (comm_s - comm_sync_s)"),
    Metric("busbw_GBps", "1e9 B/s", "each kind's wire bytes times its nccl-tests factor (all-reduce 2(n-1)/n, "
                                    "all-gather and reduce-scatter (n-1)/n, broadcast 1) / (comm_s - comm_sync_s)"),
    Metric("comm_wait_s", "s", "the part of comm_exposed_s spent waiting for slower ranks"),
    Metric("own_step_s", "s", "step_s - comm_wait_s: the rank's own time, without waiting for slower ranks"),
    Metric("samples_per_s", "1/s", "global batch / step_s of the slowest rank"),
)

COMM_KINDS = {
    "allreduce": "DDP's gradient all-reduce (every bucket; exposed as comm_exposed_s defines it)",
    "allgather_fwd": "FSDP's all-gather of a block's parameters before its forward",
    "allgather_bwd": "FSDP's all-gather of a block's parameters again in backward (reshard_after_forward=true)",
    "reducescatter": "FSDP's reduce-scatter of a block's gradients",
    "broadcast": "ZeRO-1's broadcast of each rank's updated parameter partition after optimizer.step()",
}
"""The kinds of collective each strategy issues; ``comm_sync_s`` (DDP's buffer broadcast) is the one more part."""
STRATEGY_KINDS = {"ddp": ("allreduce",), "zero1": ("allreduce", "broadcast"),
                  "fsdp": ("allgather_fwd", "allgather_bwd", "reducescatter")}
KIND_SUFFIXES = {"_s": ("s", "busy time: the union of its calls' [issue, completion]"),
                 "_exposed_s": ("s", "the part of it the training thread waited for (on the critical path)"),
                 "_bytes": ("bytes", "bytes on the wire (all-gather: the gathered output; reduce-scatter: the "
                                     "unsharded input; all-reduce and broadcast: the buffer)")}


def kind_keys(strategy: str) -> tuple[str, ...]:
    """The per-kind step keys of a strategy: ``comm_<kind>_s``, ``comm_<kind>_exposed_s``, ``comm_<kind>_bytes``.

    Per step, the kinds' busy times plus ``comm_sync_s`` add up to ``comm_s``, their exposed times plus
    ``comm_sync_s`` to ``comm_exposed_s``.
    """
    return keys_of_kinds(STRATEGY_KINDS.get(strategy, ()))


def keys_of_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """``comm_<kind>_s``, ``comm_<kind>_exposed_s``, ``comm_<kind>_bytes`` of each kind, in order."""
    return tuple(f"comm_{kind}{suffix}" for kind in kinds for suffix in KIND_SUFFIXES)


STEP_METRICS += tuple(Metric(f"comm_{kind}{suffix}", unit, f"{what}: {meaning}")
                      for kind, what in COMM_KINDS.items() for suffix, (unit, meaning) in KIND_SUFFIXES.items())
UNITS = {m.key: m.unit for m in STEP_METRICS}
MEANINGS = {m.key: m.meaning for m in STEP_METRICS}

PHASE_KEYS = ("step_s", "data_s", "forward_s", "backward_s", "optimizer_s", "other_s", "compute_s")
COMM_KEYS = ("comm_s", "comm_exposed_s", "comm_sync_s", "overlap", "comm_bytes", "comm_wire_bytes", "comm_buckets",
             "algbw_GBps", "busbw_GBps")
CROSS_RANK_KEYS = ("comm_wait_s", "own_step_s")
"""Made at the reduction from every rank's values, never measured by one rank alone."""
BARE_KEYS = ("step_s",)
"""What the bare loop (instrument.enabled=false) measures."""


def local_keys(instrumented: bool, world_size: int, strategy: str = "ddp") -> tuple[str, ...]:
    """The keys one rank measures per step (the columns gathered from every rank)."""
    if not instrumented:
        return BARE_KEYS
    return PHASE_KEYS + COMM_KEYS + kind_keys(strategy) if world_size > 1 else PHASE_KEYS


def null_keys(instrumented: bool, world_size: int) -> tuple[str, ...]:
    """Keys that have no value in this run: a single process has no peer to communicate with."""
    return COMM_KEYS + CROSS_RANK_KEYS if instrumented and world_size == 1 else ()


SHARES = ("compute", "comm_exposed", "data", "other")
"""The four parts of a step; they add up to ``step_s``. ``comm_wait`` is a part of ``comm_exposed``."""
SHARE_LABELS = {"compute": "compute", "comm_exposed": "exposed communication", "data": "data loading",
                "other": "framework overhead"}
SHARE_FRACS = tuple(f"{name}_frac" for name in SHARES)
"""The summary keys of the shares of the total measured time."""

MEMORY_KEYS = ("params", "grads", "optimizer_state", "activations", "autocast_weights", "comm_buffers", "peak",
               "rss_peak", "params_unsharded", "model_state")
"""run.json ``memory.max`` and each ``memory.per_rank`` entry, in bytes (null where not measured).

Under ``dist.strategy=zero1|fsdp`` ``params``, ``grads`` and ``optimizer_state`` are what the rank holds
(its shards); ``params_unsharded`` (fsdp) is the most parameter bytes gathered at once; ``model_state`` is
``params + grads + optimizer_state``, the quantity run.json's ``memory_model`` predicts."""
MEMORY_CATEGORIES = ("params", "grads", "optimizer_state", "activations", "comm_buffers")
"""The categories a rank's memory is split into (the report stacks them)."""
MEMORY_LABELS = {"params": "parameters", "grads": "gradients", "optimizer_state": "optimizer state",
                 "activations": "saved activations", "comm_buffers": "DDP buckets"}
MODEL_STATE_KEYS = ("params", "grads", "optimizer_state")
"""What ``model_state`` sums (measured in run.json ``memory``, predicted in ``memory_model``)."""

BOUNDS = ("communication", "straggler", "skew", "data", "compute")
"""The values of the summary's ``bound``: ``straggler`` when the waiting for slower ranks is the largest share
and one rank is to blame (scaling.records.waiting), ``skew`` when it is and the ranks take turns."""


def verdict(fracs: Mapping[str, Any]) -> str:
    """The largest of: exposed transfer, waiting for slower ranks (as the rank that waited most saw it),
    data loading, compute. ``fracs`` holds summary keys (``<part>_frac``); a missing one counts as 0. The
    waiting is ``straggler`` when ``fracs["straggler"]`` names a rank, ``skew`` otherwise."""
    waiting = "straggler" if fracs.get("straggler") else "skew"
    shares = {
        "communication": (fracs.get("comm_exposed_frac") or 0.0) - (fracs.get("comm_wait_frac") or 0.0),
        waiting: fracs.get("comm_wait_max_frac") or 0.0,
        "data": fracs.get("data_frac") or 0.0,
        "compute": fracs.get("compute_frac") or 0.0,
    }
    return max(shares, key=shares.get)
