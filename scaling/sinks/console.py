"""Human-readable output: per-rank loggers and the end-of-run table."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from scaling.instruments import roofline
from scaling.records import waiting
from scaling.records.schema import COMM_KINDS, MEMORY_KEYS, SHARE_LABELS, SHARES, STRATEGY_KINDS

GIB = 1024**3
MIB = 1024**2


def make_logger(rank: int, console: bool) -> logging.Logger:
    """Rank 0 logs to the console; every rank logs to its file once the run folder exists."""
    logger = logging.getLogger(f"scaling.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers.clear()
    if console and rank == 0:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def add_file(logger: logging.Logger, path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


def fmt_flops(n: float | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


KIND_LABELS = {"allreduce": "gradient all-reduce", "allgather_fwd": "all-gather in forward",
               "allgather_bwd": "all-gather in backward", "reducescatter": "gradient reduce-scatter",
               "broadcast": "ZeRO-1 parameter broadcast"}
assert set(KIND_LABELS) == set(COMM_KINDS)


def verdict_sentence(summary: dict[str, Any], world_size: int, strategy: str = "ddp") -> str:
    bound = summary.get("bound")
    what = "gradient all-reduce" if strategy in ("ddp", "none") else "communication"
    pct = {k: 100 * (summary.get(f"{k}_frac") or 0.0) for k in (*SHARES, "comm_wait")}
    transfer = pct["comm_exposed"] - pct["comm_wait"]
    hidden = 100 * (summary.get("overlap") or 0.0)
    if bound == "communication":
        return (f"Communication-bound on {processes(world_size)}: the exposed {what} is "
                f"{transfer:.0f}% of the step (compute {pct['compute']:.0f}%), and only "
                f"{hidden:.0f}% of the communication is hidden behind {'backward' if what != 'communication' else 'compute'}.")
    if bound == "straggler":
        return (f"Straggler-bound on {processes(world_size)}: a rank waits up to "
                f"{100 * (summary.get('comm_wait_max_frac') or 0):.0f}% of the step for a slower one "
                f"({straggler_clause(summary)}); compute {pct['compute']:.0f}%.")
    if bound == "skew":
        return (f"Skew-bound on {processes(world_size)}: a rank waits up to "
                f"{100 * (summary.get('comm_wait_max_frac') or 0):.0f}% of the step for slower ranks, and no rank is "
                f"to blame ({skew_clause(summary)}); compute {pct['compute']:.0f}%.")
    if bound == "data":
        return (f"Data-bound on {processes(world_size)}: waiting for batches is {pct['data']:.0f}% of the step "
                f"(compute {pct['compute']:.0f}%); more loader workers or faster storage would help first.")
    if world_size == 1:
        return f"Compute-bound on 1 process: compute is {pct['compute']:.0f}% of the step; no peer, no communication."
    line = (f"Compute-bound on {processes(world_size)}: compute is {pct['compute']:.0f}% of the step; exposed "
            f"communication is {transfer:.0f}% ({hidden:.0f}% of the {what} is hidden behind compute).")
    if summary.get("straggler"):
        line += f" Waiting for a slower rank: {pct['comm_wait']:.0f}% ({straggler_clause(summary)})."
    elif summary.get("waiting") and pct["comm_wait"] >= 1:
        line += f" Waiting for slower ranks: {pct['comm_wait']:.0f}%, skew ({skew_clause(summary)})."
    return line


def skew_clause(summary: dict[str, Any]) -> str:
    """Ranks take turns being last: how often each was, and how far apart the ranks' own times are."""
    info = summary.get("waiting") or {}
    if not info.get("ranks"):
        return "ranks take turns"
    spread = f", the slowest rank's own time {1e3 * info['own_spread_s']:.1f} ms above the fastest's per step " \
             "(median)" if info.get("own_spread_s") is not None else ""
    return f"ranks take turns: last to arrive {waiting.last_arrivals(info['ranks'], info['steps'])}{spread}"


def straggler_clause(summary: dict[str, Any]) -> str:
    info = summary.get("straggler") or {}
    last = f", last to arrive in {info['last']} of {info['steps']} steps" if info.get("steps") else ""
    if info.get("phase") is None:
        return f"rank {info.get('rank', '?')}{last}"
    return (f"rank {info['rank']}, {1e3 * info['lost_s']:.0f} ms per step more in {info['phase']} than the "
            f"others{last}")


def ops_lines(ops: dict[str, Any], top: int = 5) -> list[str]:
    """Time by kind of operator, and the operators that took most of it."""
    rows, hardware = ops["rows"], ops["hardware"]
    total = sum(r["time_s"] for r in rows) or 1.0
    by_kind = roofline.time_by_kind(rows)
    ridges = ", ".join(f"{p} {v:.1f}" for p, v in hardware["ridge"].items())
    peaks = ", ".join(f"{p} {fmt_flops(v)}/s" for p, v in hardware["peak_flops_per_s"].items())
    lines = ["", f"  operators ({ops['steps']} profiled steps, rank {ops['rank']}): "
                 + ", ".join(f"{kind} {100 * t / total:.0f}%" for kind, t in by_kind.items() if t > 0),
             f"    measured ceilings: {peaks}; memory {hardware['peak_membw_Bps'] / 1e9:.1f} GB/s; "
             f"ridge (FLOP/byte) {ridges}"]
    for r in sorted(rows, key=lambda r: -r["time_s"])[:top]:
        rate = (f"{(r['achieved_flops_per_s'] or 0) / 1e9:8.1f} GFLOP/s" if r["kind"] == "arithmetic"
                else f"{(r['achieved_Bps'] or 0) / 1e9:8.1f} GB/s    ")
        intensity = f"{r['intensity']:7.2f}" if r["intensity"] is not None else "      -"
        lines.append(f"    {r['pass']:<9} {r['op']:<34} {100 * r['time_s'] / total:5.1f}%  {rate}  "
                     f"FLOP/byte {intensity}  {r['kind']}")
    return lines


def render(run: dict[str, Any], ops: dict[str, Any] | None = None) -> str:
    s = run.get("summary", {})
    lines = [
        f"run {run['run_id']}: {run['exp']} ({run['model']}) on {run['world_size']} process(es), "
        f"{run['nodes']} node(s), {run['backend']} on {run['device']}, {run['threads_per_process']} thread(s) each",
        f"  batch {run['batch_size_per_rank']} per rank, {run['global_batch_size']} global; "
        f"{s.get('steps', 0)} measured steps after {run['warmup_steps']} warm-up",
        "",
        f"  step time (median)   {s.get('step_s', 0):9.4f} s   (p05 {s.get('step_s_p05', 0):.4f}, p95 {s.get('step_s_p95', 0):.4f})",
        f"  throughput           {s.get('samples_per_s', 0):9.1f} samples/s",
    ]
    if "compute_s" not in s:
        lines.append("  (instrumentation off: only the step wall clock was measured)")
        return "\n".join(lines)
    lines += ["", "  where the time goes (share of all measured steps)   s/step (median)   share"]
    communicates = s.get("comm_s") is not None
    for key in (k for k in SHARES if communicates or k != "comm_exposed"):
        lines.append(f"    {SHARE_LABELS[key]:<48} {s[f'{key}_s']:9.4f}   {100 * s[f'{key}_frac']:5.1f}%")
        if key == "comm_exposed" and s.get("comm_wait_frac"):
            lines.append(f"      {'of which waiting for a slower rank':<46} {s['comm_wait_s']:9.4f}   "
                         f"{100 * s['comm_wait_frac']:5.1f}%")
    strategy = run.get("strategy_effective") or "ddp"
    if communicates and strategy == "ddp":
        wire = s.get("comm_wire_bytes")
        sent = "" if wire is None or wire == s["comm_bytes"] else f" ({fmt_bytes(wire)} on the wire)"
        lines += [
            "",
            f"  gradient all-reduce: busy {s['comm_s']:.4f} s, exposed {s['comm_exposed_s']:.4f} s, "
            f"overlap {100 * s['overlap']:.0f}%, {fmt_bytes(s['comm_bytes'])} per step{sent}, "
            f"bus bandwidth {s['busbw_GBps']:.2f} GB/s",
        ]
    elif communicates:
        lines += ["", f"  communication ({strategy}): busy {s['comm_s']:.4f} s, exposed {s['comm_exposed_s']:.4f} s, "
                      f"overlap {100 * s['overlap']:.0f}%, {fmt_bytes(s['comm_wire_bytes'])} per step on the wire, "
                      f"bus bandwidth {s['busbw_GBps']:.2f} GB/s"]
        for kind in STRATEGY_KINDS.get(strategy, ()):
            if s.get(f"comm_{kind}_s") is not None:
                lines.append(f"    {KIND_LABELS[kind]:<28} busy {s[f'comm_{kind}_s']:.4f} s, exposed "
                             f"{s[f'comm_{kind}_exposed_s']:.4f} s, {fmt_bytes(s[f'comm_{kind}_bytes'])} per step")
        if s.get("comm_sync_s"):
            lines.append(f"  buffer broadcast before forward: {s['comm_sync_s']:.4f} s per step (counted as exposed)")
    controls = run.get("controls") or {}
    if controls.get("nocomm_step_s") and communicates:
        cost = s["step_s"] - controls["nocomm_step_s"]
        lines.append(f"  without any communication (control steps): {controls['nocomm_step_s']:.4f} s per step; "
                     f"communication costs {cost:.4f} s ({100 * cost / s['step_s']:.0f}% of the step), "
                     f"{max(0.0, cost - s['comm_exposed_s']):.4f} s of it beyond the exposed time")
    memory = run.get("memory", {}).get("max")
    if memory:
        lines += ["", "  memory per rank (max over ranks)"]
        shared = run["memory"].get("grads_in_comm_buffers")
        for key in MEMORY_KEYS:
            if key in ("autocast_weights", "params_unsharded") and not memory.get(key):
                continue
            note = "   (the same bytes: gradients are views into the DDP buckets)" if shared and key == "comm_buffers" else ""
            lines.append(f"    {key:<22} {fmt_bytes(memory.get(key)):>12}{note}")
    model = run.get("memory_model") or {}
    if memory and model.get("max") and memory.get("model_state"):
        lines.append(f"    model state predicted {fmt_bytes(model['max']['model_state'])} ({model['strategy']}, "
                     f"{processes(model['world_size'])}; textbook {fmt_bytes(model['textbook_model_state'])}, "
                     f"replicated as DDP {fmt_bytes(model['ddp_model_state'])})")
    if run.get("strategy_note"):
        lines.append(f"  note: {run['strategy_note']}")
    flops = run.get("flops") or {}
    if flops.get("per_sample"):
        mfu = flops.get("mfu")
        lines += [
            "",
            f"  FLOPs per sample {fmt_flops(flops['per_sample'])}, achieved {fmt_flops(flops.get('achieved_per_s'))}/s "
            f"per rank, peak {fmt_flops(flops.get('peak_per_s'))}/s ({flops.get('peak_source')}), "
            f"MFU {100 * mfu:.1f}%" if mfu is not None else "",
        ]
    verdict = verdict_sentence(s, run["world_size"], strategy)
    if ops:
        lines += ops_lines(ops)
        clause = roofline.compute_clause(ops["rows"], ops["hardware"]["peak_membw_Bps"])
        if clause:
            verdict = f"{verdict.rstrip('.')}; and {clause}."
    lines += ["", "  " + verdict]
    return "\n".join(lines)
