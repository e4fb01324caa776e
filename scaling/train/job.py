"""``python -m scaling.train +exp=NAME [overrides]``: one instrumented data-parallel training job.

Works as a single process, under torchrun, srun or mpiexec. The loop lives in
``scaling.train.loop``; this module parses, sets up, runs, records and tears down.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch.distributed import DistError

from scaling import config
from scaling.errors import describe
from scaling.instruments import hostprobe
from scaling.launch import group
from scaling.records import chrome_trace, provenance
from scaling.records.files import BUCKETS_JSON, OPS_JSON, RunFiles, read_json, write_json, write_run
from scaling.sinks import Sink, console
from scaling.sinks import wandb_sink
from scaling.train import failure
from scaling.train.loop import Trainer
from scaling.train.plan import Job, prepare


def process_start_time() -> float | None:
    """Unix time this process started (Linux: its start in clock ticks since boot against the uptime), or None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


STARTUP_PHASES = (("imports_s", "process_start", "imported"), ("config_s", "imported", "configured"),
                  ("group_s", "configured", "group_ready"), ("build_s", "group_ready", "built"),
                  ("warmup_s", "built", "probe_start"), ("probe_s", "probe_start", "probe_end"),
                  ("to_first_step_s", "process_start", "first_measured"))
"""run.json ``startup``: each part of the start-up, between two of its milestones."""


def startup_record(times: dict[str, float | None]) -> dict[str, float | None]:
    """This rank's milestones (Unix times) and the parts of the start-up between them, in seconds."""
    out: dict[str, float | None] = dict(times)
    for name, start, end in STARTUP_PHASES:
        a, b = times.get(start), times.get(end)
        out[name] = b - a if a is not None and b is not None else None
    return out


def describe_run(job: Job, ctx: group.Context, files: RunFiles) -> dict[str, Any]:
    cfg = job.cfg
    device = str(ctx.device)
    prov = provenance.collect(ctx.device, ctx.hostnames)
    return {
        "status": "running",
        "run_id": files.dir.name,
        "study": cfg.study_name,
        "study_kind": cfg.study_kind,
        "exp": cfg.exp_name,
        "model": cfg.model.name,
        "world_size": ctx.world_size,
        "nodes": ctx.nodes,
        "procs_per_node": job.launch.local_world_size,
        "backend": ctx.backend,
        "launcher": job.launch.launcher,
        "device": f"{device} ({prov['gpu']})" if prov.get("gpu") else f"cpu ({prov['cpu']})",
        "threads_per_process": ctx.threads,
        "batch_size_per_rank": job.batch_size,
        "global_batch_size": job.global_batch,
        "steps": cfg.train.steps,
        "warmup_steps": cfg.train.warmup_steps,
        "instrumented": cfg.instrument.enabled,
        "strategy": cfg.dist.strategy,
        "comm_hook": cfg.comm.hook,
        "bucket_cap_mb": cfg.dist.bucket_cap_mb,
        "amp": cfg.train.amp,
        "started_at": time.time(),
        "provenance": prov,
    }


def failed_run(files: RunFiles, run: dict[str, Any], cause: str | None) -> dict[str, Any]:
    """run.json as the failure left it (another rank may have written the cause)."""
    try:
        return read_json(files.run_json)
    except ValueError:
        return {**run, "status": "failed", "error": cause}


def build_sinks(job: Job, ctx: group.Context, log: logging.Logger) -> list[Sink]:
    """Rank 0 alone gets sinks; other ranks an empty list."""
    if not ctx.is_main:
        return []
    sink = wandb_sink.make(job.cfg, log)
    return [sink] if sink is not None else []


def train(cfg: DictConfig | config.RunConfig, sinks: list[Sink] | None = None) -> dict[str, Any]:
    """Run one job; returns run.json's content (on every rank). Raises on failure."""
    configured = time.time()
    run_cfg = cfg if isinstance(cfg, config.RunConfig) else config.parse(cfg)
    job = prepare(run_cfg)  # every configuration check happens before the process group
    log = console.make_logger(job.launch.rank, run_cfg.console)
    # Signals become exceptions from here on, so that an early stop (Slurm's
    # USR1, the launcher's TERM) is never a silent death.
    with failure.SignalGuard() as guard:
        if run_cfg.dist.pin:
            hostprobe.pin(job.launch.local_rank, job.launch.local_world_size)
        ctx = group.init(job.launch, run_cfg.dist)
        startup = {"process_start": process_start_time(), "imported": IMPORTED_AT, "configured": configured,
                   "group_ready": time.time()}
        try:
            return run_job(job, ctx, log, guard, sinks, startup)
        finally:
            group.teardown(ctx)


def run_job(job: Job, ctx: group.Context, log: logging.Logger, guard: failure.SignalGuard,
            sinks: list[Sink] | None, startup: dict[str, float | None] | None = None) -> dict[str, Any]:
    run_cfg = job.cfg
    prefix = f"{run_cfg.exp_name}-n{ctx.world_size}"
    files = RunFiles(ctx.agree_on_run_dir(Path(run_cfg.paths.root) / run_cfg.study_name, run_cfg.paths.run_id, prefix),
                     ctx.rank)
    console.add_file(log, files.rank_log_path(ctx.rank))
    run = describe_run(job, ctx, files)
    if ctx.is_main:
        files.write_config(run_cfg.raw)
        write_run(files.run_json, run)
    trainer: Trainer | None = None
    ops: dict[str, Any] | None = None
    # From here on run.json says "running": whatever stops the job (Ctrl-C while a sink
    # starts, a failing set-up) must leave it "failed" with the cause, never "running".
    try:
        trainer = Trainer(job, ctx, files, log, sinks=(sinks if sinks is not None else build_sinks(job, ctx, log)))
        for sink in trainer.sinks:
            sink.on_start(run)
        log.info(f"run folder {files.dir}")
        trainer.run()
        summary = trainer.summary()
        memory = trainer.memory_report()
        sharding = trainer.strategy_report()
        hardware = trainer.ceilings()  # probes after the memory report: their arrays are no part of the run
        ops = trainer.ops_report(hardware)
        if ops is not None:
            summary.update(ops["summary"])
        host = trainer.host_report()  # after the ceilings: their probes fill the cache it reads
        if host is not None:
            summary["slow_hosts"] = host["slow_ranks"]
            if summary.get("straggler"):
                summary["straggler"]["slow_host"] = summary["straggler"]["rank"] in host["slow_ranks"]
        run.update(status="completed", finished_at=time.time(), summary=summary, controls=trainer.controls,
                   memory=memory, hardware=hardware, host_probe=host, flops=trainer.flops_report(summary, ops),
                   startup=startup_record({**(startup or {}), **trainer.startup}),
                   records_gather=trainer.recorder.stats(), **sharding)
    except BaseException as exc:
        guard.handling = True
        try:
            if trainer is not None:
                trainer.record_finished_steps()
        except Exception:  # the records stay as they are; the failure itself matters more
            pass
        cause = failure.finalize_failed(files, exc, ctx.world_size, job.global_batch, job.step_keys, job.null_keys)
        for sink in trainer.sinks if trainer is not None else []:  # rank 0 alone has sinks
            sink.on_end(failed_run(files, run, cause))
        raise failure.recorded("scaling.train", cause, log, files.dir, files.logs,
                               ctx.rank) from exc
    if ctx.is_main:
        if ops is not None:
            write_json(files.dir / OPS_JSON, ops)
        if trainer.buckets:
            write_json(files.dir / BUCKETS_JSON, {
                "world_size": ctx.world_size, "comm_hook": run_cfg.comm.hook, "bucket_cap_mb": run_cfg.dist.bucket_cap_mb,
                "steps": run_cfg.train.steps, "buckets": trainer.buckets})
        if trainer.timeline_trace is not None:
            chrome_trace.write(files.dir / chrome_trace.TIMELINE_JSON, trainer.timeline_trace)
        write_run(files.run_json, run)
        for sink in trainer.sinks:
            sink.on_end(run)
        log.info("\n" + console.render(run, ops) + f"\n\n  records: {files.dir}")
    files.close()
    return run


def main(cfg: DictConfig) -> int:
    try:
        return failure.exit_status("scaling.train", lambda: train(cfg))
    except DistError as exc:  # the rendezvous itself failed: no run folder exists yet
        print(f"scaling.train: error: could not reach the other ranks: {describe(exc)}", file=sys.stderr)
        return 1


IMPORTED_AT = time.time()
"""When this module's imports (torch and the framework) were done: the first milestone after the process start."""
