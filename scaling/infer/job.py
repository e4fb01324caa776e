"""The inference sweep: set up like training, measure every batch size, gather on rank 0, write the records.

``infer.replicas=N`` serving processes run the sweep at once, each batch size
started together (a barrier), so that they contend as replicas on one node do.
Started without a launcher, the command starts itself under ``torchrun
--standalone --nproc_per_node=N``; under a launcher the world size is the
number of replicas. The process group is gloo and only gathers results: the
replicas never exchange tensors, so several may share one GPU.

The server scenario's rate is searched on each replica's own service times
(``scaling.infer.server_scenario``), then that rate and the next one up are served live,
every replica at once (``scaling.infer.live``). A failure (an exception,
SIGTERM, Slurm's SIGUSR1) leaves ``infer.json`` failed with the batch sizes
every replica finished (``scaling.infer.records``).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig

from scaling.config import ConfigError
from scaling.infer import findings
from scaling.infer import live, records
from scaling.infer import server_scenario
from scaling.infer.config import InferRun, parse
from scaling.infer.measure import Point, Server
from scaling.infer.schema import INFER_JSON, PLOT, latency_summary
from scaling.instruments import membw, roofline
from scaling.launch import detect, group
from scaling.records import provenance
from scaling.records.files import atomic_write_text, write_json
from scaling.sinks import console
from scaling.train import failure
from scaling.train.data import build_dataset
from scaling.train.faults import Injector
from scaling.train.models import build_model


SERVICE_ROUNDS = 4
"""Rounds over the batch sizes when the server's service times are measured."""


def ceilings(run: InferRun, device: torch.device, points: list[Point], concurrent: int) -> dict[str, Any]:
    """Peak FLOP/s of each precision the operators use and peak bytes/s: probed (cached) or from the config."""
    cfg = run.run
    used = set().union(*(p.ops.precisions_with_flops() for p in points if p.ops))
    precisions = sorted(({"bf16" if cfg.train.amp == "bf16" else "fp32"} | used) & set(membw.PRECISION_DTYPES))
    return membw.measured_ceilings(cfg.peak_tflops, cfg.peak_membw_GBps, device, precisions, concurrent)


def point_record(point: Point, hardware: dict[str, Any] | None) -> dict[str, Any]:
    """One batch size on one replica. ``samples_per_s`` is offline's throughput where offline ran, else single
    stream's (batch size over the mean latency); ``latency_s`` and ``queries`` are single stream's alone."""
    samples = point.latency_samples_s
    busy_rate = point.batch_size * len(samples) / sum(samples) if samples else None
    offline = point.offline
    record: dict[str, Any] = {
        "batch_size": point.batch_size, "queries": len(samples) if samples else None,
        "latency_s": latency_summary(samples) if samples else None, "single_stream_samples_per_s": busy_rate,
        "offline": ({"queries": offline.queries, "batch_size": offline.batch_size, "total_s": offline.total_s,
                     "samples_per_s": offline.samples_per_s} if offline else None),
        "samples_per_s": offline.samples_per_s if offline else busy_rate,
        "samples_per_s_from": "offline" if offline else "single_stream", "memory": point.memory,
        "compute_bound": None, "memory_frac": None, "arithmetic_frac": None}
    if point.ops is not None and hardware is not None:
        rows = point.ops.rows(hardware["peak_flops_per_s"], hardware["peak_membw_Bps"])
        record.update(roofline.summarize(rows))
        record["ops_time_s"] = sum(r["time_s"] for r in rows)
    if samples:
        record["latency_samples_s"] = samples
    if point.server_service_s is not None:
        record["server_service_s"] = point.server_service_s
        record["server_issue_lag_s"] = point.server_issue_lag_s
    return record


def searched_service(batches: list[dict[str, Any]]) -> server_scenario.ServiceTimes:
    """What the search simulates on: each batch size's service times in the serving loop, the generator's lags."""
    served = [p for p in batches if p.get("server_service_s")]
    return server_scenario.ServiceTimes({p["batch_size"]: p["server_service_s"] for p in served},
                                [lag for p in served for lag in p["server_issue_lag_s"]])


def server_result(run: InferRun, batches: list[dict[str, Any]], server: Server, ctx: group.Context,
                  log: logging.Logger) -> dict[str, Any]:
    """This replica's server scenario: the search on its recorded service times, then its answer and the next rate
    up served live (every replica at once), unless ``infer.server_replay=false``."""
    infer = run.infer
    budget_s = infer.latency_budget_ms / 1e3
    service = searched_service(batches)
    found = server_scenario.search(service, budget_s, infer.server_queries, infer.max_batch, infer.server_timeout_ms / 1e3,
                           infer.seed, infer.server_search_step)
    result = {"max_batch": infer.max_batch, "timeout_ms": infer.server_timeout_ms, "queries": infer.server_queries,
              "seed": infer.seed, **found, "replay": None}
    if found["rate_qps"] is not None:
        log.info(f"server: simulated, {found['rate_qps']:,.0f} queries/s ({found['capacity_share']:.2f} of the "
                 f"{found['capacity_qps']:,.0f} queries/s capacity) meets {infer.latency_budget_ms:g} ms p99 "
                 f"(p99 {found['p99_s'] * 1e3:.3f} ms), {found['next_rate_qps']:,.0f} misses it "
                 f"(p99 {found['next_p99_s'] * 1e3:.3f} ms)")
    if not infer.server_replay:
        return result
    replayed: dict[str, Any] = {}
    for name, rate in (("answer", found["rate_qps"]), ("next", found["next_rate_qps"])):
        # Every replica passes both barriers, replaying or not (no rate meets the budget): the replicas serve
        # together and none waits for a barrier the others never reach.
        torch.distributed.barrier(group=ctx.meta_group)
        if found["rate_qps"] is None:
            continue
        count = server_scenario.queries_at(rate, infer.server_queries, budget_s)
        log.info(f"server: serving {rate:,.0f} queries/s live ({name}), {count:,} queries, about {count / rate:.1f} s")
        replayed[name] = live.replay(server, infer.batch_sizes, rate, infer.server_queries, infer.max_batch,
                                     infer.server_timeout_ms / 1e3, infer.seed, budget_s)
        log.info(f"server: {rate:,.0f} queries/s live: p99 {replayed[name]['p99_s'] * 1e3:.3f} ms, "
                 f"mean batch {replayed[name]['mean_batch']:.2f}, "
                 f"{'meets' if replayed[name]['budget_met'] else 'misses'} {infer.latency_budget_ms:g} ms")
    if replayed:
        replayed["agrees"] = replayed["answer"]["budget_met"] and not replayed["next"]["budget_met"]
        result["replay"] = replayed
    return result


def progress(log: logging.Logger, index: int, total: int, record: dict[str, Any]) -> None:
    lat = record["latency_s"]
    bound = findings._bound(record)
    latency = f"p50 {lat['p50'] * 1e3:8.3f} ms  p99 {lat['p99'] * 1e3:8.3f} ms  " if lat else ""
    log.info(f"[{index}/{total}] batch {record['batch_size']:>4}  {latency}{record['samples_per_s']:10.1f} samples/s "
             f"({record['samples_per_s_from'].replace('_', ' ')})  "
             f"activations {console.fmt_bytes(record['memory']['activations'])}"
             + (f"  {bound}" if bound else ""))


def infer(run: InferRun) -> dict[str, Any]:
    cfg, spec = run.run, run.infer
    launch = detect.detect()
    if launch.world_size != spec.replicas:
        if launch.rank != 0:  # rank 0 says it: give it time to, before the launcher stops everyone
            time.sleep(10)
        raise ConfigError(f"infer.replicas={spec.replicas} but {launch.world_size} processes were launched; "
                          f"start {spec.replicas} (or leave the launcher out)")
    dataset, num_classes = build_dataset(cfg.data, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data, num_classes)
    pool = torch.stack([dataset[i][0] for i in range(min(len(dataset), max(spec.batch_sizes)))])
    device_choice = cfg.dist.device
    if device_choice == "auto":
        nccl = group.resolve_backend(cfg.dist.backend) == "nccl"
        device_choice = "cuda" if torch.cuda.is_available() and nccl else "cpu"
    dist_cfg = replace(cfg.dist, backend="gloo", device=device_choice)
    log = console.make_logger(launch.rank, cfg.console)
    # Signals become exceptions from here on, so that an early stop (Slurm's USR1,
    # the launcher's TERM) leaves infer.json failed with what finished.
    with failure.SignalGuard() as guard:
        ctx = group.init(launch, dist_cfg)
        try:
            return sweep(run, ctx, model, pool, log, guard)
        finally:
            group.teardown(ctx)


def sweep(run: InferRun, ctx: group.Context, model: torch.nn.Module, pool: torch.Tensor,
          log: logging.Logger, guard: failure.SignalGuard) -> dict[str, Any]:
    cfg, spec = run.run, run.infer
    files = records.RankFiles(ctx.agree_on_run_dir(Path(cfg.paths.root) / cfg.study_name, cfg.paths.run_id,
                                                   f"{cfg.exp_name}-infer-r{spec.replicas}"), ctx.rank)
    files.start()
    prov = provenance.collect(ctx.device, ctx.hostnames)
    device = f"{ctx.device} ({prov['gpu']})" if prov.get("gpu") else f"cpu ({prov['cpu']})"
    header = {"run_id": files.dir.name, "study": cfg.study_name, "exp": cfg.exp_name, "model": cfg.model.name,
              "device": device, "amp": cfg.train.amp, "threads_per_process": ctx.threads, "replicas": spec.replicas,
              "scenario": spec.scenario, "latency_budget_ms": spec.latency_budget_ms, "provenance": prov}
    if ctx.is_main:
        atomic_write_text(files.dir / "config.yaml", yaml.safe_dump(cfg.raw, sort_keys=False))
        records.write_running(files, header)
    try:
        return measure_all(run, ctx, model, pool, log, files, header, device)
    except BaseException as exc:
        guard.handling = True
        cause = records.write_failed(files, exc, ctx.world_size, header)
        raise failure.recorded("scaling.infer", cause, log, files.dir, files.logs, ctx.rank) from exc


def measure_service(run: InferRun, server: Server, points: list[Point], log: logging.Logger) -> None:
    """Each batch size the batcher may run, served back to back by the serving loop (``live.service_times``),
    just before the search: ``SERVICE_ROUNDS`` rounds over the sizes, ``infer.queries`` batches of each in all,
    so that every size sees the machine as it is then, not as it was when the sweep reached it."""
    spec = run.infer
    served_up_to = min(b for b in spec.batch_sizes if b >= spec.max_batch)  # the batcher pads up to this size
    served = [p for p in points if p.batch_size <= served_up_to]
    service: dict[int, list[float]] = {p.batch_size: [] for p in served}
    lags: dict[int, list[float]] = {p.batch_size: [] for p in served}
    for round_ in range(SERVICE_ROUNDS):
        for point in served:
            batches = spec.queries // SERVICE_ROUNDS + (round_ < spec.queries % SERVICE_ROUNDS)
            if batches:
                times, late = live.service_times(server, point.batch_size, batches,
                                                 float(np.median(point.latency_samples_s)),
                                                 spec.server_timeout_ms / 1e3, spec.seed + round_)
                service[point.batch_size] += times
                lags[point.batch_size] += late
    for point in served:
        point.server_service_s, point.server_issue_lag_s = service[point.batch_size], lags[point.batch_size]
    log.info("server: service time in the serving loop, median: "
             + ", ".join(f"batch {b} {float(np.median(t)) * 1e3:.3f} ms" for b, t in service.items()))


def measure_all(run: InferRun, ctx: group.Context, model: torch.nn.Module, pool: torch.Tensor,
                log: logging.Logger, files: records.RankFiles, header: dict[str, Any], device: str) -> dict[str, Any]:
    cfg, spec = run.run, run.infer
    amp = torch.bfloat16 if cfg.train.amp == "bf16" else None
    server = Server(model, pool, ctx.device, amp, Injector.from_env(ctx.rank))
    log.info(f"run folder {files.dir}")
    log.info(f"{cfg.exp_name}: {cfg.model.name} in inference mode on {device}, {ctx.threads} thread(s) per replica, "
             f"{spec.replicas} replica(s), amp={cfg.train.amp}, scenario={spec.scenario}")
    points = []
    for index, batch_size in enumerate(spec.batch_sizes, 1):
        torch.distributed.barrier(group=ctx.meta_group)  # the replicas serve each batch size together
        point = server.measure(batch_size, spec.queries, spec.warmup_queries, spec.runs_single_stream,
                               spec.runs_offline, spec.ops)
        points.append(point)
        files.append_batch(point_record(point, None))
        progress(log, index, len(spec.batch_sizes), point_record(point, None))
    hardware = ceilings(run, ctx.device, points, ctx.launch.local_world_size) if spec.ops else None
    if spec.runs_server:
        torch.distributed.barrier(group=ctx.meta_group)  # the replicas serve together
        measure_service(run, server, points, log)
    mine = [point_record(p, hardware) for p in points]
    found = server_result(run, mine, server, ctx, log) if spec.runs_server else None
    gathered: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, (mine, found), group=ctx.meta_group)
    record: dict[str, Any] = {}
    if ctx.is_main:
        per_replica = [batches for batches, _ in gathered]
        record = {**header, "status": "completed", "finished_at": time.time(), "hardware": hardware,
                  "batches": records.pooled(per_replica),
                  "per_replica": [{"rank": r, "batches": b} for r, b in enumerate(per_replica)]}
        if spec.runs_server:
            servers = [s for _, s in gathered]
            record["server"] = {**servers[0], "replicas_rate_qps": [s["rate_qps"] for s in servers]}
            if all(s["rate_qps"] is not None for s in servers):
                record["server"]["node_rate_qps"] = sum(s["rate_qps"] for s in servers)
            if spec.replicas > 1 and spec.server_replay:
                record["server"]["replicas_replay_agrees"] = [(s["replay"] or {}).get("agrees") for s in servers]
        record["findings"] = findings.findings(record)
        write_json(files.dir / INFER_JSON, record)
        from scaling.infer import plot

        plot.draw(record, files.dir / PLOT)
        log.info("\n" + "\n".join(f"  {line}" for line in record["findings"]) + f"\n\n  records: {files.dir}")
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
    return failure.exit_status("scaling.infer", lambda: infer(run))
