"""The record schema: what every key of ``steps.jsonl`` and ``run.json`` means.

The one table that the training job (which writes the records) and the console,
the report and wandb (which read them) share, so that a metric is defined once.
Plain Python: importing it never imports torch.

- ``STEP_METRICS``: each step key with its unit and meaning (docs/contract.md,
  "What each number means"); ``steps.jsonl`` holds each as the mean over ranks plus
  ``<key>_max`` / ``<key>_min``.
- ``SUMMARY_METRICS``: the keys run.json ``summary`` holds besides each step key's median.
- ``RUN_KEYS``: the top-level keys of run.json.
- ``SHARES`` and ``SHARE_LABELS``: the four parts of a step, whose
  ``<part>_frac`` in the summary add up to 1.
- ``COMM_KINDS``, ``STRATEGY_KINDS``, ``kind_keys()``: per kind of collective (all-reduce, FSDP's
  all-gathers and reduce-scatter, ZeRO-1's broadcast) its busy, exposed time and bytes.
- ``MEMORY_METRICS`` (``MEMORY_KEYS``), ``MEMORY_CATEGORIES``, ``MEMORY_LABELS``: run.json ``memory``.

docs/metrics.md shows these tables as ``python -m scaling.records.docs`` renders them.
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

MEMORY_METRICS = (
    Metric("params", "bytes", "parameters the rank holds (its shards under zero1/fsdp, padding included)"),
    Metric("grads", "bytes", "gradients the rank holds (its shards under fsdp)"),
    Metric("optimizer_state", "bytes", "optimizer state the rank holds (its partition under zero1, its shards "
                                       "under fsdp)"),
    Metric("activations", "bytes", "peak bytes saved for backward in one step (saved-tensor hooks, each storage "
                                   "counted once, parameters left out)"),
    Metric("autocast_weights", "bytes", "the low-precision copies of the weights autocast keeps for backward "
                                        "(train.amp=bf16), apart from activations"),
    Metric("comm_buffers", "bytes", "ddp/zero1: DDP's gradient buckets; fsdp: the most flat all-gather outputs and "
                                    "reduce-scatter inputs alive at once"),
    Metric("peak", "bytes", "CUDA: max_memory_allocated over the measured steps; CPU: growth of resident memory "
                            "over the run"),
    Metric("rss_peak", "bytes", "the process's peak resident memory"),
    Metric("params_unsharded", "bytes", "fsdp: the most parameter bytes gathered at once"),
    Metric("model_state", "bytes", "params + grads + optimizer_state: what run.json memory_model predicts"),
)
"""run.json ``memory.max`` and each ``memory.per_rank`` entry (null where not measured)."""
MEMORY_KEYS = tuple(m.key for m in MEMORY_METRICS)
MEMORY_CATEGORIES = ("params", "grads", "optimizer_state", "activations", "comm_buffers")
"""The categories a rank's memory is split into (the report stacks them)."""
MEMORY_LABELS = {"params": "parameters", "grads": "gradients", "optimizer_state": "optimizer state",
                 "activations": "saved activations", "comm_buffers": "DDP buckets"}
MODEL_STATE_KEYS = ("params", "grads", "optimizer_state")
"""What ``model_state`` sums (measured in run.json ``memory``, predicted in ``memory_model``)."""

BOUNDS = ("communication", "straggler", "skew", "data", "compute")
"""The values of the summary's ``bound``: ``straggler`` when the waiting for slower ranks is the largest share
and one rank is to blame (scaling.records.waiting), ``skew`` when it is and the ranks take turns."""

SUMMARY_METRICS = (
    Metric("step_s_p05", "s", "5th percentile of step_s over the measured steps"),
    Metric("step_s_p95", "s", "95th percentile of step_s over the measured steps"),
    Metric("steps", "count", "measured steps the summary is taken over"),
    *(Metric(f"{name}_frac", "0..1", f"{SHARE_LABELS[name]}: its time summed over the measured steps / the summed "
                                     "step_s (the four shares add up to 1)") for name in SHARES),
    Metric("comm_wait_frac", "0..1", "waiting for slower ranks (mean over ranks), a part of comm_exposed_frac"),
    Metric("comm_wait_max_frac", "0..1", "waiting for slower ranks as the rank that waited most saw it"),
    Metric("bound", "-", "communication, straggler, data or compute: the largest of exposed transfer (less the "
                         "waiting), the waiting, data loading and compute"),
    Metric("straggler", "-", "when ranks wait for a slower one: its rank, the phase where it lost its time and "
                             "the seconds lost per step (else null)"),
    Metric("measured_wall_s", "s", "wall time of all measured steps"),
    Metric("wall_samples_per_s", "1/s", "global samples over measured_wall_s"),
    Metric("arithmetic_frac", "0..1", "share of the profiled operators' time in arithmetic-bound operators "
                                      "(instrument.ops)"),
    Metric("memory_frac", "0..1", "share of the profiled operators' time in memory-bound operators"),
    Metric("compute_bound", "-", "arithmetic or memory: the larger of the two shares"),
)
"""run.json ``summary`` holds the median over measured steps of every step key, and these."""

RUN_KEYS = (
    Metric("status", "-", "running, completed or failed; run.json is replaced atomically as it changes"),
    Metric("error", "-", "when failed: the cause, naming the rank that failed"),
    Metric("run_id", "-", "the run folder's name, agreed on by every rank"),
    Metric("study", "-", "study.name: the folder the run folder lies in"),
    Metric("study_kind", "-", "strong or weak (study points), else the config's study.kind"),
    Metric("exp", "-", "the experiment overlay (+exp=NAME)"),
    Metric("model", "-", "the model's name"),
    Metric("world_size", "count", "processes in the job"),
    Metric("nodes", "count", "hosts the ranks ran on"),
    Metric("procs_per_node", "count", "ranks per host"),
    Metric("backend", "-", "gloo or nccl (null for one process)"),
    Metric("launcher", "-", "torchrun, mpi, slurm or single"),
    Metric("device", "-", "the device and its model (cpu (<CPU model>), cuda (<GPU model>))"),
    Metric("threads_per_process", "count", "intra-op threads of each rank"),
    Metric("batch_size_per_rank", "samples", "samples per rank per step"),
    Metric("global_batch_size", "samples", "samples per step over all ranks"),
    Metric("steps", "count", "train.steps: measured steps"),
    Metric("warmup_steps", "count", "train.warmup_steps: steps run first, left out of every statistic"),
    Metric("instrumented", "-", "instrument.enabled: false for the bare loop (a per-step wall clock only)"),
    Metric("strategy", "-", "dist.strategy asked for: ddp, zero1 or fsdp"),
    Metric("strategy_effective", "-", "what ran (none at world size 1: no peer)"),
    Metric("strategy_note", "-", "why the asked strategy did not apply, when it did not"),
    Metric("comm_hook", "-", "comm.hook"),
    Metric("bucket_cap_mb", "MB", "dist.bucket_cap_mb"),
    Metric("amp", "-", "train.amp: none or bf16"),
    Metric("started_at", "s", "Unix time the job started"),
    Metric("finished_at", "s", "Unix time the job ended"),
    Metric("provenance", "-", "hostnames, rank to host, CPU and GPU model, Python, platform, torch/CUDA/NCCL "
                              "versions, the package's version and git commit, NCCL_*/GLOO_*/OMP_* variables"),
    Metric("summary", "-", "the medians of the step keys and the summary keys below"),
    Metric("controls", "-", "steps, nocomm_step_s (median over the no-communication control steps of the mean "
                            "over ranks), per_rank_step_s; null when none ran"),
    Metric("memory", "-", "max and per_rank (the memory keys below, in bytes), and grads_in_comm_buffers (true "
                          "when gradients live inside DDP's buckets: grads and comm_buffers are then the same bytes)"),
    Metric("memory_model", "-", "the model state per rank predicted from the parameter shapes, optimizer and "
                                "world size"),
    Metric("hardware", "-", "measured ceilings: peak_flops_per_s per precision, peak_membw_Bps, ridge, and "
                            "where each came from"),
    Metric("flops", "-", "per_sample (forward + backward), achieved_per_s, peak_per_s, peak_source, mfu"),
    Metric("fsdp", "-", "fsdp: blocks (what fully_shard wrapped) and root_params (what the root kept)"),
    Metric("final_loss", "-", "the last measured step's loss, mean over ranks"),
    Metric("startup", "-", "rank 0's start-up: milestones (Unix times: process_start, imported, configured, "
                           "group_ready, built, probe_start, probe_end, first_measured) and the parts between them "
                           "in seconds (imports_s, config_s, group_s, build_s, warmup_s, probe_s, to_first_step_s)"),
    Metric("records_gather", "-", "rank 0's live reduction of the records, in its own thread off the steps: gathers, "
                                  "gather_s and gather_max_s (in the collective), gather_bytes (received), reduce_s "
                                  "(reduction, steps.jsonl, sinks, progress line)"),
)
"""The top-level keys of run.json (one that does not apply to a run is absent or null)."""


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
