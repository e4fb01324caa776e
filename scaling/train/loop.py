"""The instrumented data-parallel training loop (DDP, ZeRO-1 or FSDP: ``scaling.train.strategy``).

``scaling.train.plan.prepare()`` builds and checks everything that needs no process group (so a
configuration mistake never reaches one); ``Trainer.run()`` is the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from scaling.instruments import flops, hostprobe, membw, memory, ops
from scaling.instruments import probecache
from scaling.instruments import roofline
from scaling.instruments.clock import clock_for
from scaling.instruments.comm import CommTimer, StepComm, bucket_records, bucket_timeline, timeline_array
from scaling.instruments.timeline import TimelineRecorder
from scaling.instruments.timing import PHASES, StepMarks, StepTimer
from scaling.launch.group import Context
from scaling.records import aggregate, schema
from scaling.records.files import RunFiles
from scaling.sinks import Sink
from scaling.train import faults, strategy
from scaling.train.data import Batches
from scaling.train.models import loss_fn_for
from scaling.train.plan import Job
from scaling.train.recorder import Recorder

CUDA_RESOLVE_LAG_STEPS = 2
"""Steps left queued on the device when a log interval reads its events."""


@dataclass
class PendingStep:
    step: int
    marks: StepMarks
    comm: StepComm


@dataclass
class Trainer:
    job: Job
    ctx: Context
    files: RunFiles
    log: logging.Logger
    sinks: list[Sink] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # steps.jsonl's records: rank 0's alone
    memory: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.job.cfg
        self.instrumented = cfg.instrument.enabled
        self.clock = clock_for(self.ctx.device)
        # The bare loop marks only the end of each step: nothing but a wall clock.
        self.timer = StepTimer(self.clock, PHASES if self.instrumented else ("other",))
        self.comm = CommTimer(self.clock, self.ctx.world_size)
        self.amp_dtype = torch.bfloat16 if cfg.train.amp == "bf16" else None
        self.loss_fn = loss_fn_for(cfg.model)
        self._previous: PendingStep | None = None  # the last finished step, queued at the next bookkeeping
        self._pending: list[PendingStep] = []  # measured steps not yet resolved into seconds
        self._resolved: list[tuple[int, dict[str, float]]] = []  # resolved, not yet gathered
        self.rank_totals: dict[str, list[float]] = {}  # per key, each rank's sum over the measured steps (rank 0)
        self.controls: dict[str, Any] | None = None
        self.op_measurement: ops.OpMeasurement | None = None
        self._timelines: list[list[tuple[int, float, float, int, int]]] = []  # per measured step, this rank's buckets
        self.buckets: list[dict[str, Any]] | None = None  # buckets.json, every rank's timeline reduced
        self.faults = faults.Injector.from_env(self.ctx.rank, self.ctx.world_size)
        self.timeline: TimelineRecorder | None = None  # the first measured steps' marks, for timeline.json
        if self.instrumented and cfg.instrument.timeline_steps > 0:
            self.timeline = TimelineRecorder(self.clock, self.ctx.device, cfg.instrument.timeline_steps,
                                             cfg.train.warmup_steps, lambda: self.comm.waited_kinds)
        self.timeline_trace: dict[str, Any] | None = None  # timeline.json's content, on rank 0
        self.host_probes: dict[str, dict[str, float]] = {}  # "before" / "after" the measured steps
        self.rss_at_start = memory.rss_bytes()
        self.startup: dict[str, float] = {}  # Unix times of the start-up's milestones (run.json ``startup``)
        self.recorder: Recorder | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def build(self) -> None:
        cfg, job, device = self.job.cfg, self.job, self.ctx.device
        self.batches = Batches(job.dataset, job.batch_size, self.ctx.rank, self.ctx.world_size, device,
                               cfg.data.num_workers, cfg.train.seed)
        if self.instrumented and cfg.instrument.flops:
            step_flops = flops.count_step_flops_on_meta(job.model, self.loss_fn, job.dataset[0], job.batch_size)
            if step_flops is None:  # an operator without a meta kernel: count on a real batch instead
                step_flops = flops.count_step_flops(job.model.to(device), self.loss_fn, self.batches.next(),
                                                    self.amp_dtype)
            self.flops["per_sample"] = step_flops / job.batch_size
        model = self.module = job.model.to(device)
        self.buffers = [b for b in model.buffers()]
        # No peer (world size 1): the model a single-process user would train, unwrapped.
        self.parallel = strategy.build(model, cfg, job.hook, self.ctx, self.comm, self.instrumented)
        self.model, self.optimizer = self.parallel.model, self.parallel.optimizer
        self.sync_buffers = self.parallel.sync_buffers
        self.memory["params"] = self.parallel.memory()["params"]
        self.activations = memory.SavedActivations(model, gathered=self.parallel.effective == "fsdp")
        self.measures_activations = self.instrumented and cfg.instrument.memory  # in the first step
        # The records' gathers get a gloo group and a thread of their own: off the training path.
        timeout = self.job.cfg.dist.timeout_s
        self.recorder = Recorder(dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)),
                                 self.ctx.rank, self.ctx.world_size, self._record_gathered, timeout,
                                 before_gather=(lambda step: self.faults.stall("records", step)) if self.faults else None)
        self.startup["built"] = time.time()

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        self.build()
        train = self.job.cfg.train
        total = train.warmup_steps + train.steps
        self.log.info(f"training {total} steps ({train.warmup_steps} warm-up), batch {self.job.batch_size} per rank")
        self.timer.restart()
        for step in range(total):
            if step == train.warmup_steps:
                self.startup["probe_start"] = time.time()
                self._probe_host("before")
                self.startup["probe_end"] = time.time()
                self._begin_measuring()
            inputs, targets = self.batches.next()
            self._stall("data", step)
            self.timer.mark("data")
            if self.sync_buffers:
                self.comm.sync(lambda: strategy.broadcast_buffers(self.buffers))
            self._stall("forward", step)
            loss = self._loss(inputs, targets, save_activations=step == 0 and self.measures_activations)
            self.timer.mark("forward")
            self.comm.begin_backward(self.clock.mark())
            self.parallel.backward(loss)
            self.timer.mark("backward")
            self._stall("optimizer", step)
            self.optimizer.step()
            if step == 0:
                self.memory.update(self.parallel.memory())  # the gradients exist until zero_grad()
                self.parallel.stop_memory_tracking()
            self.optimizer.zero_grad()
            self.timer.mark("optimizer")
            self._bookkeeping(step)
            if step == total - 1 or self._is_log_step(step):
                check_finite(loss, step)  # a NaN stays in the weights: one look per interval catches it
            self.timer.mark("other")
            self._previous = PendingStep(step, self.timer.finish(), self.comm.take_step())
        self.last_loss = float(loss.detach()) if total else float("nan")  # once, after the loop: no per-step sync
        self._end_measuring()
        self._probe_host("after")
        self._run_controls(total)
        self._profile_ops()

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, save_activations: bool = False) -> torch.Tensor:
        """The forward pass under the run's autocast, the one every kind of step runs; ``save_activations``
        measures what autograd keeps for backward (the first step)."""
        with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None), \
                (self.activations.active() if save_activations else contextlib.nullcontext()):
            return self.loss_fn(self.model(inputs), targets)

    def _stall(self, phase: str, step: int) -> None:
        """The test-only fault injection's sleep in ``phase`` (scaling.train.faults), where one is set."""
        if self.faults:
            self.faults.stall(phase, step)

    def _run_controls(self, first_step: int) -> None:
        """``instrument.control_steps`` more steps with no communication at all: the counterfactual.

        Same processes, placement, batches and optimizer; gradients stay local
        (DDP's ``no_sync``), no buffers and no ZeRO-1 partitions are broadcast. FSDP has
        no such step (it gathers its parameters in every step): none runs. Left out of every
        other statistic; their median step is ``controls.nocomm_step_s``.
        """
        count = self.job.cfg.instrument.control_steps
        no_sync = self.parallel.no_comm()
        if not self.instrumented or count == 0 or no_sync is None:
            return
        marks = [self.clock.mark()]
        with no_sync:
            for step in range(first_step, first_step + count):
                inputs, targets = self.batches.next()
                self._stall("data", step)
                self._stall("forward", step)
                self.parallel.backward(self._loss(inputs, targets))
                self._stall("optimizer", step)
                self.optimizer.step()
                self.optimizer.zero_grad()
                marks.append(self.clock.mark())
        local = torch.tensor([self.clock.seconds_between(a, b) for a, b in zip(marks, marks[1:])], dtype=torch.float64)
        per_rank = self.ctx.gather_tensor(local).numpy()  # [rank, step]
        self.controls = {
            "steps": count,
            "nocomm_step_s": float(statistics.median(per_rank.mean(axis=0))),
            "per_rank_step_s": [float(statistics.median(row)) for row in per_rank],
        }

    def _profile_ops(self) -> None:
        """``instrument.ops_steps`` more steps under the profiler (one more counts FLOPs and bytes).

        Steps as the measured ones run them, communication included; left out
        of every other statistic. Fault injection is not repeated here.
        """
        cfg = self.job.cfg
        if not self.instrumented or not cfg.instrument.ops:
            return

        def step(phase) -> None:
            inputs, targets = self.batches.next()
            if self.sync_buffers:
                strategy.broadcast_buffers(self.buffers)
            with phase("forward"):
                loss = self._loss(inputs, targets)
            with phase("backward"):
                self.parallel.backward(loss)
            with phase("optimizer"):
                self.optimizer.step()
                self.optimizer.zero_grad()

        trace = self.files.dir / "profile" / f"rank{self.ctx.rank}.json" if cfg.instrument.profile_trace else None
        self.op_measurement = ops.profile_ops(step, cfg.instrument.ops_steps, self.ctx.device,
                                              runs_in_tf32=flops.runs_in_tf32, trace_path=trace)

    def _probe_host(self, when: str) -> None:
        """The short GEMM and copy probe (scaling.instruments.hostprobe), outside the steps and the memory peaks."""
        if not (self.instrumented and self.job.cfg.instrument.host_probe):
            return
        with memory.outside_peaks(self.ctx.device):
            self.host_probes[when] = hostprobe.probe(self.ctx.device)

    def host_report(self) -> dict[str, Any] | None:
        """run.json ``host_probe``: every rank's two probes against the cached fp32 ceilings (or the config's).

        Only a ceiling already cached is read (the op profile's ceilings, when they ran, have just filled the
        cache); none is probed here, so that a job without the op profile never pays for the long probes."""
        if set(self.host_probes) != set(hostprobe.PROBES):
            return None
        cfg, device, concurrent = self.job.cfg, self.ctx.device, self.job.launch.local_world_size
        row = [self.host_probes[w][k] for w in hostprobe.PROBES for k in ("flops_per_s", "membw_Bps", "seconds")]
        table = self.ctx.gather_tensor(torch.tensor(row, dtype=torch.float64)).tolist()
        cores = self.ctx.gather_object(hostprobe.cores())
        if cfg.peak_tflops is not None:
            peak_flops, flops_source = cfg.peak_tflops * 1e12, "config"
        else:
            peak_flops = probecache.lookup("peak_flops", flops.cache_key(device, torch.float32, concurrent))
            flops_source = "cache" if peak_flops else None
        if cfg.peak_membw_GBps is not None:
            bandwidth, membw_source = cfg.peak_membw_GBps * 1e9, "config"
        else:
            found = probecache.lookup("peak_membw", membw.cache_key(device, torch.float32, concurrent))
            bandwidth = found.get("peak_membw_Bps") if isinstance(found, dict) else None
            membw_source = "cache" if bandwidth else None
        return hostprobe.record(table, self.ctx.hostnames, cores, peak_flops, bandwidth, flops_source, membw_source)

    def ceilings(self) -> dict[str, Any] | None:
        """``hardware``: peak FLOP/s of each precision the operators use, peak bytes/s, the ridges.

        Probed (cached) or taken from ``hardware.peak_tflops`` / ``hardware.peak_membw_GBps``; every
        process of a host probes at once, as they train at once.
        """
        if self.op_measurement is None:
            return None
        cfg, device, concurrent = self.job.cfg, self.ctx.device, self.job.launch.local_world_size
        main = "bf16" if self.amp_dtype is not None else "fp32"
        precisions = sorted(({main} | self.op_measurement.precisions_with_flops()) & set(membw.PRECISION_DTYPES))
        return membw.measured_ceilings(cfg.peak_tflops, cfg.peak_membw_GBps, device, precisions, concurrent)

    def ops_report(self, hardware: dict[str, Any] | None) -> dict[str, Any] | None:
        """The content of ops.json (this rank's operators), or None when they were not profiled."""
        if self.op_measurement is None or hardware is None:
            return None
        record = ops.ops_record(self.op_measurement, hardware["peak_flops_per_s"], hardware["peak_membw_Bps"])
        return {"rank": self.ctx.rank, **record, "hardware": hardware}

    def _begin_measuring(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()  # once, so that the wall clock starts on an idle device
            # The first steps (DDP's bucket rebuild among them) hold more than
            # any measured step: the peak is that of the measured steps.
            memory.reset_cuda_peak(self.ctx.device)
        if self.timeline is not None:  # the clocks' alignment: barriers, before the wall clock starts
            self.timeline.align("begin", self.ctx.meta_group, self.ctx.world_size)
        self.wall_start = time.perf_counter()
        self.startup["first_measured"] = time.time()
        self.timer.restart()

    def _end_measuring(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        self.wall_s = time.perf_counter() - self.wall_start
        # The peaks of the measured steps alone: read before the control steps and the profiled
        # ones (whose buffers must not count) run.
        self.memory["peak"] = memory.peak_bytes(self.ctx.device, self.rss_at_start)
        self.memory["rss_peak"] = memory.rss_peak_bytes()
        self._take_previous()
        self._resolve_pending()
        self._gather_and_record()
        self.recorder.drain()  # every interval recorded before any other collective of the end
        # Once every rank has drained (rank 0 holds every row), the records' group is closed on all ranks
        # together, not at the teardown while a peer may still be writing its records.
        dist.barrier(group=self.ctx.meta_group)
        dist.destroy_process_group(self.recorder.group)
        self.recorder.group = None  # its last reference: the group and its gloo workers end here (group.teardown)
        self._gather_buckets()
        self._gather_timeline()

    def _gather_timeline(self) -> None:
        """After the measured steps: the alignment's second barriers, then the gathers of timeline.json."""
        if self.timeline is None:
            return
        self.timeline.align("end", self.ctx.meta_group, self.ctx.world_size)
        cfg = self.job.cfg
        self.timeline_trace = self.timeline.gather(self.ctx, {
            "run_id": self.files.dir.name, "backend": self.job.backend if self.ctx.world_size > 1 else None,
            "device": self.ctx.device.type, "strategy": self.parallel.effective, "comm_hook": cfg.comm.hook,
            "warmup_steps": cfg.train.warmup_steps})

    def _gather_buckets(self) -> None:
        """One gather of every rank's per-bucket timeline at the end: ``self.buckets``."""
        if not self.instrumented or self.ctx.world_size == 1 or not self.parallel.has_ddp_buckets:
            return
        local = torch.from_numpy(timeline_array(self._timelines))
        self.buckets = bucket_records(self.ctx.gather_tensor(local).numpy())

    def _take_previous(self) -> None:
        """Queue the last finished step for resolution (once), if it was a measured one."""
        previous, self._previous = self._previous, None
        if previous is not None and previous.step >= self.job.cfg.train.warmup_steps:
            self._pending.append(previous)

    def record_finished_steps(self) -> None:
        """After a failure: write this rank's finished steps that are still in memory.

        No collective: the other ranks may be gone. On CUDA only steps whose
        events have completed can be resolved without waiting. The records'
        thread writes nothing more: the failure path rebuilds steps.jsonl from
        the per-rank files.
        """
        if self.recorder is not None:
            self.recorder.close()
        self._take_previous()
        if self.ctx.device.type == "cuda":
            self._pending = [p for p in self._pending if p.marks.marks["other"].query()]
        self._resolve_pending()

    def _bookkeeping(self, step: int) -> None:
        """Per-step work of the instrument itself; it is timed as ``other_s`` of this step."""
        self._take_previous()
        if self.ctx.device.type != "cuda":
            self._resolve_pending()  # host timestamps cost nothing to resolve
        if self._is_log_step(step):
            # On CUDA, waiting for the last steps' events would drain the
            # device's queue (a bubble the plain loop never has): the newest
            # steps wait for the next interval.
            self._resolve_pending(keep=CUDA_RESOLVE_LAG_STEPS if self.ctx.device.type == "cuda" else 0)
            self._gather_and_record()

    def _is_log_step(self, step: int) -> bool:
        measured = step - self.job.cfg.train.warmup_steps
        return measured > 0 and measured % self.job.cfg.train.log_every == 0

    def _resolve_pending(self, keep: int = 0) -> None:
        """Turn the marks of pending steps into seconds, all but the newest ``keep``."""
        ready, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        for pending in ready:
            values = self.timer.resolve(pending.marks)
            if self.instrumented:
                if self.ctx.world_size > 1:
                    values.update(self.comm.resolve(pending.comm))
                    self._timelines.append(bucket_timeline(self.clock, pending.comm.events))
                aggregate.derive(values)
                if self.timeline is not None and self.timeline.wants(pending.step):
                    self.timeline.add(pending.step, pending.marks, pending.comm, values)
            else:
                values = {"step_s": values["step_s"]}
            self.files.append_rank_step(pending.step, values)
            self._resolved.append((pending.step, values))

    def _gather_and_record(self) -> None:
        """Queue the resolved steps for the records' thread (``scaling.train.recorder``); no waiting here."""
        if not self._resolved:
            return
        keys = self.job.step_keys
        self.recorder.submit([step for step, _ in self._resolved],
                             [[values[k] for k in keys] for _, values in self._resolved])
        self._resolved.clear()

    def _record_gathered(self, steps: list[int], gathered: np.ndarray) -> None:
        """In rank 0's records thread: one interval gathered from every rank, reduced and recorded."""
        keys = self.job.step_keys
        records, totals = aggregate.reduce_steps(gathered, keys, steps, self.job.global_batch, self.job.null_keys)
        aggregate.add_totals(self.rank_totals, totals)
        self.records.extend(records)
        self.files.append_steps(records)
        for sink in self.sinks:
            sink.on_steps(records)
        self._progress(records[-1])

    def _progress(self, last: dict[str, Any]) -> None:
        train = self.job.cfg.train
        done = len(self.records)
        recent = [r["step_s_max"] for r in self.records[-train.log_every:]]
        eta = (train.steps - done) * float(np.median(recent))
        line = f"step {done:>5}/{train.steps}  step {last['step_s']:.4f} s  {last['samples_per_s']:8.1f} samples/s"
        if last.get("comm_exposed_s") is not None and last["step_s"] > 0:
            line += f"  exposed comm {100 * last['comm_exposed_s'] / last['step_s']:4.1f}%"
        self.log.info(f"{line}  slowest rank {last['slowest_rank']}  eta {eta:.0f} s")

    # -- results --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Made on rank 0, which holds the records, and sent to every rank."""
        summary = None
        if self.ctx.is_main:
            summary = aggregate.summarize(self.records, self.job.step_keys, self.job.null_keys, self.rank_totals)
            summary["measured_wall_s"] = self.wall_s
            summary["wall_samples_per_s"] = self.job.global_batch * len(self.records) / self.wall_s
        return self.ctx.broadcast_object(summary) if self.ctx.world_size > 1 else summary

    def memory_report(self) -> dict[str, Any]:
        """Every rank's categories, gathered once at the end."""
        held = self.parallel.memory()
        for key in ("params", "grads", "params_unsharded"):
            self.memory.setdefault(key, held[key])
        self.memory["optimizer_state"] = held["optimizer_state"]
        measured = self.measures_activations
        if self.parallel.effective == "fsdp" and not measured:
            self.memory["params_unsharded"] = None
        if self.instrumented:
            self.memory["activations"] = self.activations.bytes if measured else None
            self.memory["autocast_weights"] = self.activations.autocast_weight_bytes if measured else None
            if self.parallel.effective == "fsdp":
                self.memory["comm_buffers"] = self.parallel.tracker.buffers_peak if measured else None
            elif self.ctx.world_size > 1:
                self.memory["comm_buffers"] = sum(self.comm.bucket_buffer_bytes.values())
            else:
                self.memory["comm_buffers"] = None
        self.memory["model_state"] = sum(self.memory[k] for k in schema.MODEL_STATE_KEYS)
        self.memory.setdefault("peak", memory.peak_bytes(self.ctx.device, self.rss_at_start))
        self.memory.setdefault("rss_peak", memory.rss_peak_bytes())
        local = torch.tensor([float(self.memory.get(k) if self.memory.get(k) is not None else -1) for k in schema.MEMORY_KEYS],
                             dtype=torch.float64)
        table = self.ctx.gather_tensor(local).numpy()
        per_rank = [{k: (int(v) if v >= 0 else None) for k, v in zip(schema.MEMORY_KEYS, row)} for row in table]
        maximum = {k: (max(r[k] for r in per_rank) if per_rank[0][k] is not None else None) for k in schema.MEMORY_KEYS}
        # With bucket views the gradients are stored inside the comm buffers:
        # one allocation, reported under both names; do not add them up.
        return {"max": maximum, "per_rank": per_rank,
                "grads_in_comm_buffers": (self.instrumented and self.parallel.has_ddp_buckets
                                          and self.job.cfg.dist.gradient_as_bucket_view)}

    def strategy_report(self) -> dict[str, Any]:
        """run.json: the strategy, the predicted model state per rank (``memory_model``) and the last
        measured step's loss, averaged over the ranks (``final_loss``: strategies compared on the same data)."""
        losses = self.ctx.gather_tensor(torch.tensor([self.last_loss], dtype=torch.float64)).numpy()
        return {**self.parallel.record(), "memory_model": self.parallel.memory_model(self.job.cfg, self.ctx.world_size),
                "final_loss": float(losses.mean())}

    def flops_report(self, summary: dict[str, Any], ops_json: dict[str, Any] | None = None) -> dict[str, Any]:
        """MFU; with an op profile the peak is that of each operator's own precision (TF32 convolutions
        beside fp32 matrix products), weighted by their FLOPs."""
        if "per_sample" not in self.flops:
            return {}
        cfg = self.job.cfg
        mixed = roofline.effective_peak(ops_json["rows"]) if ops_json else None
        if mixed is not None:
            peak, source = mixed, "probe" if cfg.peak_tflops is None else "config"
        elif cfg.peak_tflops is not None:
            peak, source = cfg.peak_tflops * 1e12, "config"
        else:
            dtype = self.amp_dtype or torch.float32
            tf32 = flops.runs_in_tf32(self.ctx.device, dtype, convolutions=cfg.model.kind == "resnet")
            peak = flops.peak_flops(self.ctx.device, dtype, concurrent=self.job.launch.local_world_size, tf32=tf32)
            source = "probe"
        achieved = self.flops["per_sample"] * self.job.batch_size / summary["step_s"]
        return {"per_sample": self.flops["per_sample"], "achieved_per_s": achieved, "peak_per_s": peak,
                "peak_source": source, "mfu": achieved / peak if peak > 0 else None}


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite: every later step would train on it."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLoss(f"the loss is {value} at step {step}: training diverged or the data holds NaN/inf "
                            "(lower optim.lr or check the inputs)")
