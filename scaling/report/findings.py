"""Plain-language findings, each computed from the records of a study."""

from __future__ import annotations

from scaling.report import waterfall
from scaling.report.configdiff import KeyDiff
from scaling.report.metrics import SizeStats, StudyStats, failed_points
from scaling.report.study_folder import KIND_LABELS, collectives
from scaling.records import waiting
from scaling.records.schema import SHARE_LABELS, SHARES

NOISE_WARN = 0.10
"""Run-to-run spread of the step time above which differences are called noise."""
EFFICIENCY_DROP = 0.05
"""A fall of efficiency between neighbouring world sizes worth explaining (5 points)."""


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def mib(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def procs(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def pm(size: SizeStats, key: str, value: float, places: int, unit: str = "", scale: float = 1.0) -> str:
    """``1.52x ± 0.10`` where the size has an interval of ``key`` (scaling.report.intervals), else the value."""
    found = size.intervals.get(key)
    if found is None or found.high - found.low < 10 ** -places / scale:
        return f"{value * scale:.{places}f}{unit}"
    return f"{value * scale:.{places}f}{unit} [{found.low * scale:.{places}f}, {found.high * scale:.{places}f}]"


def headline(stats: StudyStats) -> str | None:
    sizes = stats.sizes
    if not sizes or stats.baseline is None:
        return None
    last = sizes[-1]
    planned = stats.records.definition.get("nprocs") or [r.world_size for r in stats.records.runs]
    if planned and min(planned) < stats.baseline:
        missing = f"The baseline is {procs(stats.baseline)} because no run at {min(planned)} completed. "
    else:
        missing = ""
    if len(sizes) == 1:
        return missing + (f"Only {procs(last.world_size)} completed: no scaling to compare yet "
                f"(median step {last.step_s.median:.4f} s, {last.samples_per_s.median:.1f} samples/s).")
    if stats.kind == "strong":
        return missing + (f"Strong scaling (global batch {last.global_batch} fixed) from {procs(stats.baseline)} to "
                f"{last.world_size}: speedup {pm(last, 'speedup', last.speedup.median, 2, 'x')} where "
                f"{last.world_size / stats.baseline:.0f}x would be ideal, efficiency "
                f"{pm(last, 'efficiency', last.efficiency.median, 0, '%', 100)}.")
    if stats.kind == "weak":
        return missing + (f"Weak scaling (per-rank batch {last.batch_per_rank} fixed) from {procs(stats.baseline)} to "
                f"{last.world_size}: efficiency {pm(last, 'efficiency', last.efficiency.median, 0, '%', 100)} (step time "
                f"{sizes[0].step_s.median:.4f} s -> {last.step_s.median:.4f} s), scaled speedup "
                f"{last.speedup.median:.2f}x of an ideal {last.world_size / stats.baseline:.0f}x.")
    return (f"Neither the global nor the per-rank batch is the same at every world size, so speedup and "
            f"efficiency are not defined; step times run from {sizes[0].step_s.median:.4f} s to {last.step_s.median:.4f} s.")


def boundness(stats: StudyStats) -> str | None:
    """The verdict of the largest size, and the smallest size from which it holds."""
    sizes = [s for s in stats.sizes if s.bound]
    if not sizes:
        return None
    last = sizes[-1]
    start = len(sizes) - 1
    while start > 0 and sizes[start - 1].bound == last.bound:
        start -= 1
    since = f"from {procs(sizes[start].world_size)} on" if start < len(sizes) - 1 else f"at {procs(last.world_size)}"
    if start == 0 and len(sizes) > 1:
        since = "at every world size"
    share = last.shares
    if last.bound == "communication":
        ddp = stats.strategy == "ddp"
        behind = "backward" if ddp else "compute"
        hidden = f"; {pct(last.overlap)} of communication is hidden behind {behind}" if last.overlap is not None else ""
        exposed = ("the exposed all-reduce" if ddp else
                   f"exposed communication ({collectives(stats.strategy)}, {stats.strategy})")
        return (f"Communication-bound {since}: at {procs(last.world_size)} {exposed} is "
                f"{pct(share['comm_exposed'])} of the step (compute {pct(share['compute'])}){hidden}.")
    if last.bound == "straggler":
        return f"Straggler-bound {since}: at {procs(last.world_size)} {straggler_text(last)}."
    if last.bound == "skew":
        return f"Skew-bound {since}: at {procs(last.world_size)} {skew_text(last)}."
    if last.bound == "data":
        return (f"Data-bound {since}: at {procs(last.world_size)} waiting for batches is {pct(share['data'])} of "
                "the step; more loader workers (data.num_workers) or faster storage come first.")
    exposed = ", ".join(f"{pct(s.shares['comm_exposed'])} at {s.world_size}" for s in sizes)
    return (f"Compute-bound {since}: compute is {pct(share['compute'])} of the step at {procs(last.world_size)}; "
            f"exposed communication is {exposed} (share of the step by world size).")


def operators(stats: StudyStats) -> str | None:
    """What limits the compute itself (the op profile): memory bandwidth against arithmetic, by world size.

    Shares of the compute operators' time only (memory-bound over memory- plus arithmetic-bound), so that
    communication operators, which appear only with peers, do not dilute the comparison.
    """
    sizes = [s for s in stats.sizes if s.memory_frac is not None and s.arithmetic_frac is not None
             and s.memory_frac + s.arithmetic_frac > 0]
    if not sizes:
        return None

    def memory_share(s: SizeStats) -> float:
        return s.memory_frac / (s.memory_frac + s.arithmetic_frac)

    def at(s: SizeStats) -> str:
        batch = f" (batch {s.batch_per_rank} per rank)" if s.batch_per_rank else ""
        return f"{pct(memory_share(s))} at {procs(s.world_size)}{batch}"

    first, last = sizes[0], sizes[-1]
    kind = "memory-bound" if memory_share(last) > 0.5 else "arithmetic-bound"
    shares = at(last) if first is last else f"{at(first)} and {at(last)}"
    text = (f"Compute is {kind} at {procs(last.world_size)}: memory-bound operators take {shares} of the "
            "compute operators' time, the rest is arithmetic-bound")
    moved = memory_share(last) - memory_share(first)
    smaller = first.batch_per_rank and last.batch_per_rank and last.batch_per_rank < first.batch_per_rank
    if first is not last and moved > 0.05 and smaller:
        text += "; a smaller per-rank batch reuses each weight fewer times"
    return text + "."


def straggler_text(size: SizeStats) -> str:
    """Who the others wait for, where it loses its time, and how much of the step the waiting is."""
    share = f"waiting for slower ranks is {pct(size.comm_wait_frac)} of the time" if size.comm_wait_frac else ""
    who = size.straggler
    if not who:
        return share or "ranks wait for each other"
    where = f" in {who['phase']}" if who.get("phase") else ""
    lost = f" ({who['lost_s'] * 1e3:.2f} ms per step more than the others)" if who.get("lost_s") else ""
    text = f"the ranks wait for rank {who['rank']}, which loses its time{where}{lost}"
    info = size.waiting or {}
    if info.get("kind") == "straggler":
        last = info["ranks"][info["candidate"]]["last"]
        drawn = waiting.draws(info["steps"], info.get("stretches", info["steps"]), info.get("stretches_won", last))
        text += (f"; it arrived last in {last} of {drawn} (p = {info['p_value']:.2g} against 1 "
                 f"in {len(info['ranks'])}) and its excess explains {pct(info['explained'])} of the others' waiting")
    if who.get("of", 1) > 1:
        text += f" (named in {who['runs']} of {who['of']} repeats)"
    if who.get("slow_host") is True:
        text += "; its host was the slow one (the host probe: throttling or a noisy neighbour)"
    elif who.get("slow_host") is False:
        text += "; its host delivered what the others' did at the host probe, so look at what the rank itself does"
    return f"{share}: {text}" if share else text


def skew_text(size: SizeStats) -> str:
    """Waiting that no rank is to blame for: its size, who arrived last how often, and why no one is named."""
    info = size.waiting or {}
    text = (f"waiting for slower ranks is {pct(size.comm_wait_frac or 0.0)} of the time, and no rank is to "
            "blame: the ranks take turns being last")
    if info.get("ranks"):
        text += f" (last arrivals {waiting.last_arrivals(info['ranks'], info['steps'])}"
        if info.get("own_spread_s") is not None:
            text += (f"; the slowest rank's own step is {info['own_spread_s'] * 1e3:.1f} ms longer than the "
                     "fastest's, median per step")
        text += ")"
    if info.get("reason"):
        text += f"; no straggler named because {info['reason']}"
    return text


SKEW_WORTH = 0.05
"""Skew worth a finding of its own: the waiting is at least this share of the time."""


def stragglers(stats: StudyStats) -> str | None:
    """A straggler named at a size whose verdict is not already "straggler" (there boundness names it); else
    skew worth saying at a size whose verdict is not already "skew"."""
    named = [s for s in stats.sizes if s.straggler and s.bound != "straggler"]
    if named:
        size = named[-1]
        return f"Straggler at {procs(size.world_size)}: {straggler_text(size)}."
    skewed = [s for s in stats.sizes if not s.straggler and s.bound not in ("straggler", "skew") and s.waiting
              and (s.comm_wait_frac or 0.0) >= SKEW_WORTH]
    if skewed:
        size = skewed[-1]
        return f"Skew at {procs(size.world_size)}: {skew_text(size)}."
    return None


def lost_efficiency(stats: StudyStats) -> str | None:
    """Where the efficiency went, in points, at the largest world size (scaling.report.waterfall)."""
    return waterfall.finding(stats.waterfall) if stats.waterfall is not None else None


def efficiency_loss(stats: StudyStats) -> str | None:
    """Where efficiency falls most between neighbouring sizes, and which share of the step grew."""
    pairs = [(a, b) for a, b in zip(stats.sizes, stats.sizes[1:])
             if a.efficiency and b.efficiency and a.shares and b.shares]
    if not pairs or stats.kind not in ("strong", "weak"):
        return None
    a, b = max(pairs, key=lambda p: p[0].efficiency.median - p[1].efficiency.median)
    drop = a.efficiency.median - b.efficiency.median
    if drop < EFFICIENCY_DROP:
        return (f"Efficiency stays within {pct(EFFICIENCY_DROP)} points between neighbouring world sizes "
                f"({pct(stats.sizes[-1].efficiency.median)} at {procs(stats.sizes[-1].world_size)}).")
    grew = max(SHARES, key=lambda k: b.shares[k] - a.shares[k])
    ideal = a.parts_s["compute"] * (a.world_size / b.world_size if stats.kind == "strong" else 1.0)
    if beyond_noise(a, b, grew):
        reason = (f"the {SHARE_LABELS[grew]} share of the step grew from {pct(a.shares[grew])} to "
                  f"{pct(b.shares[grew])}")
    else:  # a cause within noise is never the reason given
        reason = (f"no share of the step grew beyond the noise (the largest rise, {SHARE_LABELS[grew]} "
                  f"{pct(a.shares[grew])} -> {pct(b.shares[grew])}, is within the shares' 95% intervals)")
    return (f"Efficiency falls most from {procs(a.world_size)} to {b.world_size} ({pct(a.efficiency.median)} -> "
            f"{pct(b.efficiency.median)}): {reason}; compute per step went from "
            f"{a.parts_s['compute']:.4f} s to {b.parts_s['compute']:.4f} s (perfect "
            f"{'splitting' if stats.kind == 'strong' else 'weak scaling'} would give {ideal:.4f} s).")


def beyond_noise(a: SizeStats, b: SizeStats, share: str) -> bool:
    """The share rose from ``a`` to ``b`` beyond the noise: their intervals do not overlap (where both have one)."""
    low, high = b.intervals.get(f"{share}_frac"), a.intervals.get(f"{share}_frac")
    return low is None or high is None or low.low > high.high


def communication(stats: StudyStats) -> str | None:
    multi = [s for s in stats.sizes if s.world_size > 1 and s.comm_s and s.busbw_GBps is not None]
    if not multi:
        return None
    last = multi[-1]
    totals = (f"busy {last.comm_s.median * 1e3:.1f} ms per step, {last.comm_exposed_s.median * 1e3:.1f} ms of it "
              f"exposed ({pct(last.overlap or 0.0)} hidden), bus bandwidth {last.busbw_GBps:.2f} GB/s")
    if stats.strategy == "ddp":
        return f"Gradient all-reduce at {procs(last.world_size)}: {totals}."
    names = collectives(stats.strategy)
    kinds = "; ".join(f"{KIND_LABELS[k]} {v['s'] * 1e3:.1f}/{v['exposed_s'] * 1e3:.1f} ms, {mib(v['bytes'])}"
                      for k, v in last.comm_kinds.items())
    by_kind = f"; by kind (busy/exposed per step, bytes on the wire): {kinds}" if kinds else ""
    return f"{names[0].upper()}{names[1:]} ({stats.strategy}) at {procs(last.world_size)}: {totals}{by_kind}."


def memory(stats: StudyStats) -> str | None:
    if not stats.sizes:
        return None
    first, last = stats.sizes[0], stats.sizes[-1]
    state = [sum(s.memory_bytes.get(k) or 0 for k in ("params", "grads", "optimizer_state")) for s in (first, last)]
    if not any(state):
        return None
    text = (f"Per-rank model state (parameters, gradients, optimizer state) is {mib(state[-1])} at "
            f"{procs(last.world_size)}")
    if last is first:
        text += "."
    elif abs(state[0] - state[-1]) < 1:
        replica = ": DDP keeps a full replica on every rank" if stats.strategy == "ddp" else ""
        text += f", the same as at {procs(first.world_size)}{replica}."
    else:
        text += f" ({mib(state[0])} at {procs(first.world_size)})."
    if stats.strategy != "ddp" and last.predicted_model_state_bytes is not None:
        text = text[:-1] + (f"; memory_model predicts {mib(last.predicted_model_state_bytes)} for {stats.strategy} "
                            f"at {procs(last.world_size)}, {mib(last.predicted_ddp_model_state_bytes)} for a DDP "
                            "replica.")
    act = (first.memory_bytes.get("activations"), last.memory_bytes.get("activations"))
    if None not in act and last is not first:
        text += (f" Saved activations go from {mib(act[0])} to {mib(act[1])} (per-rank batch "
                 f"{first.batch_per_rank} -> {last.batch_per_rank}).")
    return text


def step_noise(stats: StudyStats) -> str:
    """How wide the median step's interval is, the widest size named."""
    sized = [(s, s.intervals["step_s"]) for s in stats.sizes if "step_s" in s.intervals and s.step_s.median]
    if not sized:
        return ""
    size, found = max(sized, key=lambda p: (p[1].high - p[1].low) / p[0].step_s.median)
    width = (found.high - found.low) / 2 / size.step_s.median
    return (f" The median step's 95% bootstrap interval (steps and repeats) is up to ±{100 * width:.0f}% of it "
            f"(at {procs(size.world_size)}): differences smaller than that are noise.")


def noise(stats: StudyStats) -> str | None:
    spread = [s for s in stats.sizes if s.step_s.count > 1]
    if not spread:
        return ("One completed run per world size: the run-to-run noise is unknown "
                "(study.repeats=3 shows it as error bars); the intervals shown hold the step-to-step noise only."
                + step_noise(stats)) if stats.sizes else None
    worst = max(spread, key=lambda s: s.step_s.relative_range)
    if worst.step_s.relative_range > NOISE_WARN:
        return (f"Noisy: the step time varies by {pct(worst.step_s.relative_range)} of its median between repeats at "
                f"{procs(worst.world_size)}; differences smaller than that are not significant." + step_noise(stats))
    return (f"Repeats agree: the step time varies by at most {pct(worst.step_s.relative_range)} of its median "
            f"between repeats." + step_noise(stats))


def fairness(stats: StudyStats) -> str | None:
    runs = [r for r in stats.records.runs if r.completed]
    threads = sorted({r.threads_per_process for r in runs if r.threads_per_process is not None})
    if not threads:
        return None
    if len(threads) > 1:
        return (f"Unfair comparison: the runs used different intra-op threads per process ({threads}); "
                "the step times mix the effect of threads with that of processes.")
    cores = max((r.run.get("provenance", {}).get("cpu_count") or 0 for r in runs), default=0)
    text = (f"Every run used {threads[0]} intra-op thread(s) per process at every world size, so the points differ "
            f"only in the number of processes.")
    crowded = [r.world_size for r in runs if cores and (r.nodes or 1) == 1 and r.world_size * threads[0] > cores]
    if crowded:
        text += (f" From {procs(min(crowded))} on, processes x threads exceed the {cores} cores of the machine: those "
                 "points measure contention for cores as well as scaling.")
    return text


def slow_nodes(stats: StudyStats) -> str | None:
    """Ranks whose host delivered clearly less than its ceiling or its peers at the host probe (run.json
    host_probe, scaling.instruments.hostprobe), by world size."""
    named = []
    for run in sorted((r for r in stats.records.runs if r.completed), key=lambda r: (r.world_size, r.run_id)):
        probe = run.run.get("host_probe") or {}
        for rank in probe.get("ranks", []):
            if rank.get("slow"):
                where = f"host {rank['host']}" + (f", cores {','.join(map(str, rank['cores']))}" if rank.get("cores")
                                                  else "")
                named.append(f"rank {rank['rank']} of {procs(run.world_size)} ({run.run_id}; {where}): "
                             f"{'; '.join(rank['reasons'])}")
    if not named:
        return None
    shown = named[:4] + ([f"and {len(named) - 4} more"] if len(named) > 4 else [])
    return ("Slow node: throttling or a noisy neighbour (the host probe delivered clearly less than the ceiling "
            "or the other ranks, before and after the measured steps): " + "; ".join(shown) + ".")


def low_ceiling(stats: StudyStats) -> str | None:
    """Runs whose GEMM ceiling is below what every rank's host probe delivered (run.json host_probe
    ``ceiling_below_delivered``): their MFU and roofline read against too low a peak."""
    low = [r for r in stats.records.runs if r.completed and (r.run.get("host_probe") or {}).get("ceiling_below_delivered")]
    if not low:
        return None
    probe = low[0].run["host_probe"]
    delivered = [rank[when]["gflops"] for r in low for rank in r.run["host_probe"]["ranks"] for when in ("before", "after")]
    fix = ("delete peak_flops.json in the probe cache ($XDG_CACHE_HOME/scaling, ~/.cache/scaling) to probe again "
           "on an idle host" if probe.get("ceiling_flops_source") == "probe" else "correct hardware.peak_tflops")
    return (f"Peak FLOP/s too low: the ceiling of {probe['ceiling_gflops']:.1f} GFLOP/s "
            f"({probe.get('ceiling_flops_source') or 'unknown source'}) is below what every rank's host probe "
            f"delivered ({min(delivered):.1f}-{max(delivered):.1f} GFLOP/s) in {len(low)} of "
            f"{sum(r.completed for r in stats.records.runs)} run(s), so MFU and the roofline's ridge read high; "
            f"{fix}.")


def failures(stats: StudyStats) -> list[str]:
    out = [f"Point {run_id} failed: {cause}." for run_id, cause in failed_points(stats)]
    done = {(r.solo_batch, r.repeat) for r in stats.records.controls if r.completed}
    for run in stats.records.controls:
        if not run.completed and (run.solo_batch, run.repeat) not in done:
            out.append(f"Control {run.run_id} failed: {run.error or 'status ' + run.status}.")
            done.add((run.solo_batch, run.repeat))
    return out


def study_findings(stats: StudyStats) -> list[str]:
    found = [headline(stats), lost_efficiency(stats), boundness(stats), stragglers(stats), slow_nodes(stats),
             low_ceiling(stats), efficiency_loss(stats),
             communication(stats), operators(stats), memory(stats), noise(stats), fairness(stats), *failures(stats)]
    if not stats.sizes:
        found.insert(0, "No run of this study completed: nothing to measure.")
    return [f for f in found if f]


def comparison_findings(studies: list[StudyStats], diffs: list[KeyDiff]) -> list[str]:
    if len(studies) < 2:
        return []
    out = []
    if diffs:
        shown = "; ".join(f"{d.key} ({' vs '.join(d.values.values())})" for d in diffs[:6])
        more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        out.append(f"The studies differ in {shown}{more}.")
    else:
        out.append("No configuration key differs between the studies: differences below are run-to-run noise.")
    if len({st.strategy for st in studies}) > 1:
        return out  # the strategies' own comparison (scaling.report.strategies) sets step times side by side
    shared = sorted(set.intersection(*({s.world_size for s in st.sizes} for st in studies)))
    for n in shared:
        at_n: list[tuple[StudyStats, SizeStats]] = [(st, st.size(n)) for st in studies]
        fast, fast_size = min(at_n, key=lambda p: p[1].step_s.median)
        slow, slow_size = max(at_n, key=lambda p: p[1].step_s.median)
        if fast is slow:
            continue
        out.append(f"At {procs(n)}, {fast.name} takes {fast_size.step_s.median:.4f} s per step, "
                   f"{slow_size.step_s.median / fast_size.step_s.median:.2f}x faster than {slow.name} "
                   f"({slow_size.step_s.median:.4f} s).")
    return out
