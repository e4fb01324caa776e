"""The inference sweep: set up like training, measure every batch size, gather on rank 0, write the records.

``infer.replicas=N`` serving processes run the sweep at once, each batch size
started together (a barrier), so that they contend as replicas on one node do.
Started without a launcher, the command starts itself under ``torchrun
--standalone --nproc_per_node=N``; under a launcher the world size is the
number of replicas. The process group is gloo and only gathers results: the
replicas never exchange tensors, so several may share one GPU.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig

from scaling.config import ConfigError
from scaling.infer import findings as infer_findings
from scaling.infer import server as serving
from scaling.infer.config import InferRun, parse
from scaling.infer.measure import Point, Server
from scaling.infer.schema import INFER_JSON, PLOT, latency_summary
from scaling.instruments import membw, roofline
from scaling.launch import detect, group
from scaling.records import provenance
from scaling.records.files import atomic_write_text, write_json
from scaling.sinks import console
from scaling.train.data import build_dataset
from scaling.train.models import build_model

def ceilings(run: InferRun, device: torch.device, points: list[Point], concurrent: int) -> dict[str, Any]:
    """Peak FLOP/s of each precision the operators use and peak bytes/s: probed (cached) or from the config."""
    cfg = run.run
    used = set().union(*(p.ops.precisions_with_flops() for p in points if p.ops))
    precisions = sorted(({"bf16" if cfg.train.amp == "bf16" else "fp32"} | used) & set(membw.PRECISION_DTYPES))
    return membw.measured_ceilings(cfg.peak_tflops, cfg.peak_membw_GBps, device, precisions, concurrent)


def point_record(point: Point, hardware: dict[str, Any] | None) -> dict[str, Any]:
    samples = point.latency_samples_s
    busy_rate = point.batch_size * len(samples) / sum(samples)
    record = {"batch_size": point.batch_size, "queries": len(samples), "latency_s": latency_summary(samples),
              "samples_per_s": point.offline_samples_per_s or busy_rate, "single_stream_samples_per_s": busy_rate,
              "offline_samples_per_s": point.offline_samples_per_s, "memory": point.memory,
              "compute_bound": None, "memory_frac": None, "arithmetic_frac": None}
    if point.ops is not None and hardware is not None:
        rows = point.ops.rows(hardware["peak_flops_per_s"], hardware["peak_membw_Bps"])
        record.update(roofline.summarize(rows))
        record["ops_time_s"] = sum(r["time_s"] for r in rows)
    record["latency_samples_s"] = samples
    return record


def pooled(replicas: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The node's view: every replica's samples pooled, throughput summed, memory summed, bounds of replica 0."""
    if len(replicas) == 1:
        return [{k: v for k, v in p.items() if k != "latency_samples_s"} for p in replicas[0]]
    out = []
    for same in zip(*replicas):
        samples = [s for p in same for s in p["latency_samples_s"]]
        first = same[0]
        out.append({**{k: v for k, v in first.items() if k != "latency_samples_s"},
                    "queries": len(samples), "latency_s": latency_summary(samples),
                    "samples_per_s": sum(p["samples_per_s"] for p in same),
                    "single_stream_samples_per_s": sum(p["single_stream_samples_per_s"] for p in same),
                    "offline_samples_per_s": (sum(p["offline_samples_per_s"] for p in same)
                                              if first["offline_samples_per_s"] is not None else None),
                    "memory": {k: sum(p["memory"][k] for p in same) for k in first["memory"]}})
    return out


def server_result(run: InferRun, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The server scenario on one replica's recorded service times."""
    infer = run.infer
    service = serving.ServiceTimes({p["batch_size"]: p["latency_samples_s"] for p in batches})
    found = serving.search(service, infer.latency_budget_ms / 1e3, infer.server_queries, infer.max_batch,
                           infer.server_timeout_ms / 1e3, infer.seed)
    return {"max_batch": infer.max_batch, "timeout_ms": infer.server_timeout_ms, "queries": infer.server_queries,
            "seed": infer.seed, **found}


def progress(log: logging.Logger, index: int, total: int, record: dict[str, Any]) -> None:
    lat = record["latency_s"]
    bound = infer_findings._bound(record)
    log.info(f"[{index}/{total}] batch {record['batch_size']:>4}  p50 {lat['p50'] * 1e3:8.3f} ms  "
             f"p99 {lat['p99'] * 1e3:8.3f} ms  {record['samples_per_s']:10.1f} samples/s  "
             f"activations {console.fmt_bytes(record['memory']['activations'])}"
             + (f"  {bound}" if bound else ""))


def infer(run: InferRun) -> dict[str, Any]:
    cfg, spec = run.run, run.infer
    launch = detect.detect()
    if launch.world_size != spec.replicas:
        raise ConfigError(f"infer.replicas={spec.replicas} but {launch.world_size} processes were launched; "
                          f"start {spec.replicas} (or leave the launcher out)")
    dataset, num_classes = build_dataset(cfg.data, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data, num_classes)
    pool = torch.stack([dataset[i][0] for i in range(min(len(dataset), max(spec.batch_sizes)))])
    device_choice = cfg.dist.device
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() and group.resolve_backend(cfg.dist.backend) == "nccl" else "cpu"
    dist_cfg = replace(cfg.dist, backend="gloo", device=device_choice)
    log = console.make_logger(launch.rank, cfg.console)
    ctx = group.init(launch, dist_cfg)
    try:
        return sweep(run, ctx, model, pool, log)
    finally:
        group.teardown()


def sweep(run: InferRun, ctx: group.Context, model: torch.nn.Module, pool: torch.Tensor,
          log: logging.Logger) -> dict[str, Any]:
    cfg, spec = run.run, run.infer
    run_dir = ctx.agree_on_run_dir(Path(cfg.paths.root) / cfg.study_name, cfg.paths.run_id,
                                   f"{cfg.exp_name}-infer-r{spec.replicas}")
    if ctx.is_main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.raw, sort_keys=False))
    amp = torch.bfloat16 if cfg.train.amp == "bf16" else None
    server = Server(model, pool, ctx.device, amp)
    prov = provenance.collect(ctx.device, ctx.hostnames)
    device = f"{ctx.device} ({prov['gpu']})" if prov.get("gpu") else f"cpu ({prov['cpu']})"
    log.info(f"run folder {run_dir}")
    log.info(f"{cfg.exp_name}: {cfg.model.name} in inference mode on {device}, {ctx.threads} thread(s) per replica, "
             f"{spec.replicas} replica(s), amp={cfg.train.amp}, scenario={spec.scenario}")
    points = []
    for index, batch_size in enumerate(spec.batch_sizes, 1):
        torch.distributed.barrier(group=ctx.meta_group)  # the replicas serve each batch size together
        point = server.measure(batch_size, spec.queries, spec.warmup_queries, spec.runs_offline, spec.ops)
        points.append(point)
        progress(log, index, len(spec.batch_sizes), point_record(point, None))
    hardware = ceilings(run, ctx.device, points, ctx.launch.local_world_size) if spec.ops else None
    mine = [point_record(p, hardware) for p in points]
    gathered: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, mine, group=ctx.meta_group)
    record: dict[str, Any] = {}
    if ctx.is_main:
        record = {"status": "completed", "run_id": run_dir.name, "study": cfg.study_name, "exp": cfg.exp_name,
                  "model": cfg.model.name, "device": device, "amp": cfg.train.amp,
                  "threads_per_process": ctx.threads, "replicas": spec.replicas, "scenario": spec.scenario,
                  "latency_budget_ms": spec.latency_budget_ms, "finished_at": time.time(), "hardware": hardware,
                  "batches": pooled(gathered),
                  "per_replica": [{"rank": r, "batches": b} for r, b in enumerate(gathered)],
                  "provenance": prov}
        if spec.runs_server:
            per_replica = [server_result(run, b) for b in gathered]
            record["server"] = {**per_replica[0], "replicas_rate_qps": [s["rate_qps"] for s in per_replica]}
            if all(s["rate_qps"] is not None for s in per_replica):
                record["server"]["node_rate_qps"] = sum(s["rate_qps"] for s in per_replica)
        record["findings"] = infer_findings.findings(record)
        write_json(run_dir / INFER_JSON, record)
        from scaling.infer import plot

        plot.draw(record, run_dir / PLOT)
        log.info("\n" + "\n".join(f"  {line}" for line in record["findings"]) + f"\n\n  records: {run_dir}")
    return record


def relaunch(replicas: int, argv: list[str]) -> int:
    """This command again, as ``replicas`` processes under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={replicas}",
           "-m", "scaling.infer", *argv]
    return subprocess.run(cmd).returncode


def main(cfg: DictConfig) -> int:
    run = parse(cfg)  # every check before anything is built or created
    if run.infer.replicas > 1 and detect.detect().launcher == "single":
        return relaunch(run.infer.replicas, sys.argv[1:])
    infer(run)
    return 0
