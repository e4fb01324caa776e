"""The framework's own cost as the job grows: bookkeeping, the records' gather, start-up, records, report.

    python scripts/overhead_by_world.py --nprocs 2,4,8,16,32 --out overhead_by_world.json
    python scripts/overhead_by_world.py --nprocs 16 --repeats 3 --against /work/main   # A/B, interleaved

Runs the small MLP job (``JOB`` below, 1 thread per process) under ``torchrun --standalone`` at each
process count and reads what the run recorded:

- bookkeeping on the critical path: ``other_s`` per step (median over the steps between log
  intervals, and the log steps' mean over ranks and slowest rank), its share of the measured time
  (``summary.other_frac``), and the log step's ``step_s_max`` against the median step;
- the records' gather (run.json ``records_gather``, off the steps in a thread of its own): seconds
  and bytes per log interval;
- the start-up from launch to the first measured step (run.json ``startup``: launcher, imports,
  config, process group, build, warm-up, host probe);
- the records' size on disk (the run folder, the per-rank step files) and the time of
  ``python -m scaling.report`` over the run's folder.

Then it fits each cost in N and extends it to 1,024 and 8,192 ranks (the models are printed with the
table). ``--against DIR`` runs the same job from another checkout of the framework (its own
``scaling`` package, the same Python) in the same loop, alternating which goes first, and prints
both side by side. A speed figure, never a test: on a shared two-core host jobs spread by 10-50 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
JOB = ["+exp=mlp", "model.hidden=64", "model.in_features=32", "train.batch_size=4", "instrument.ops=false",
       "logger.wandb.mode=disabled", "dist.threads=1"]
"""The issue's small MLP; the op profile is off (its ceiling probes hold ~1.5 GB per process, more than
16 processes fit in on a 23 GB host, and they run after the measured steps)."""
EXTEND_TO = (1024, 8192)
STARTUP_PARTS = ("launch_s", "imports_s", "config_s", "group_s", "build_s", "warmup_s", "probe_s")


def run_job(checkout: Path, nproc: int, steps: int, root: Path, study: str, extra: list[str],
            timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scaling.train", *JOB, f"train.steps={steps}", f"paths.root={root}", f"study.name={study}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1"}
    launched = time.time()
    try:
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"nprocs": nproc, "ok": False, "error": f"timed out after {timeout_s:.0f} s"}
    ended = time.time()
    folders = sorted((root / study).glob("*/run.json"))
    if proc.returncode != 0 or not folders:
        return {"nprocs": nproc, "ok": False, "error": (proc.stderr or proc.stdout)[-600:]}
    run_dir = folders[-1].parent
    out = read_run(run_dir, launched, ended)
    out["report_s"] = time_report(checkout, root / study, env)
    return {"nprocs": nproc, "ok": True, "run_dir": str(run_dir), **out}


def read_run(run_dir: Path, launched: float, ended: float) -> dict[str, Any]:
    run = json.loads((run_dir / "run.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
    warmup, log_every = run["warmup_steps"], 10
    is_log = [(r["step"] - warmup) > 0 and (r["step"] - warmup) % log_every == 0 for r in steps]
    plain = [r for r, log in zip(steps, is_log) if not log]
    logs = [r for r, log in zip(steps, is_log) if log]
    summary = run["summary"]
    out: dict[str, Any] = {
        "step_s": summary["step_s"],
        "other_frac": summary["other_frac"],
        "other_s_step": statistics.median(r["other_s"] for r in plain),
        "other_s_log": statistics.mean(r["other_s"] for r in logs) if logs else None,
        "other_s_log_max": max(r["other_s_max"] for r in logs) if logs else None,
        "log_step_s_max": statistics.mean(r["step_s_max"] for r in logs) if logs else None,
        "step_s_max_median": statistics.median(r["step_s_max"] for r in plain),
        "job_wall_s": ended - launched,
        "run_dir_bytes": sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()),
        "rank_files_bytes": sum(p.stat().st_size for p in (run_dir / "logs").glob("rank*.steps.jsonl")),
        "run_json_bytes": (run_dir / "run.json").stat().st_size,
    }
    gather = run.get("records_gather")
    if gather and gather.get("gathers"):
        out["gather_s"] = gather["gather_s"] / gather["gathers"]
        out["gather_max_s"] = gather["gather_max_s"]
        out["gather_bytes"] = gather["gather_bytes"] / gather["gathers"]
        out["reduce_s"] = gather["reduce_s"] / gather["gathers"]
    startup = run.get("startup")
    if startup and startup.get("process_start"):
        out.update({k: startup.get(k) for k in STARTUP_PARTS if k in startup})
        out["launch_s"] = startup["process_start"] - launched
        out["to_first_step_s"] = startup["first_measured"] - launched
    return out


def time_report(checkout: Path, study_dir: Path, env: dict[str, str]) -> float | None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "scaling.report", str(study_dir)], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=600)
    return time.perf_counter() - t0 if proc.returncode == 0 else None


def tiled(values: list[Any], ranks: int) -> list[Any]:
    """``values`` (one per rank) repeated out to ``ranks`` entries, each dict's ``rank`` renumbered."""
    out = []
    for r in range(ranks):
        value = values[r % len(values)]
        out.append({**value, "rank": r} if isinstance(value, dict) and "rank" in value else value)
    return out


def synthetic_run(run_dir: Path, ranks: int, study_dir: Path) -> Path:
    """A copy of a real run's records grown to ``ranks`` ranks: every per-rank list in run.json and the
    per-rank step files tiled from the real ranks (steps.jsonl, already reduced over the ranks, as it is)."""
    run = json.loads((run_dir / "run.json").read_text())
    world = run["world_size"]
    run.update(world_size=ranks, global_batch_size=run["batch_size_per_rank"] * ranks, procs_per_node=ranks)
    for path in (("provenance", "rank_hosts"), ("summary", "waiting", "ranks"), ("controls", "per_rank_step_s"),
                 ("memory", "per_rank"), ("host_probe", "ranks"), ("memory_model", "per_rank")):
        holder = run
        for key in path[:-1]:
            holder = holder.get(key) or {}
        if isinstance(holder.get(path[-1]), list) and len(holder[path[-1]]) == world:
            holder[path[-1]] = tiled(holder[path[-1]], ranks)
    target = study_dir / f"{run['run_id']}-x{ranks}"
    (target / "logs").mkdir(parents=True)
    for name in ("config.yaml", "steps.jsonl", "buckets.json"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, target / name)
    (target / "run.json").write_text(json.dumps(run, indent=2))
    for r in range(ranks):
        shutil.copy(run_dir / "logs" / f"rank{r % world}.steps.jsonl", target / "logs" / f"rank{r}.steps.jsonl")
    return target


def synthetic_report(run_dir: Path, ranks: int, root: Path) -> dict[str, Any]:
    """Build the synthetic records and time ``python -m scaling.report`` over them."""
    study_dir = root / f"synthetic-{ranks}"
    t0 = time.perf_counter()
    target = synthetic_run(run_dir, ranks, study_dir)
    built_s = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "scaling.report", str(study_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    report_s = time.perf_counter() - t0
    report = (study_dir / "report.md").read_text() if (study_dir / "report.md").exists() else ""
    return {"ranks": ranks, "from_ranks": json.loads((run_dir / "run.json").read_text())["world_size"],
            "built_s": built_s, "report_s": report_s, "report_ok": proc.returncode == 0,
            "report_error": None if proc.returncode == 0 else proc.stderr[-600:],
            "run_json_bytes": (target / "run.json").stat().st_size,
            "run_dir_bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file()),
            "report_md_bytes": len(report.encode()), "longest_report_line": max(map(len, report.splitlines()), default=0)}


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get("ok") and r.get(key) is not None]
    return statistics.median(values) if values else None


def fit_linear(ns: list[int], ys: list[float]) -> tuple[float, float] | None:
    """y = a + b·N, least squares with a, b >= 0 (b alone when a would be negative)."""
    if len(ns) < 2:
        return None
    n, y = np.asarray(ns, float), np.asarray(ys, float)
    b, a = np.polyfit(n, y, 1)
    if a < 0:
        a, b = 0.0, float((n @ y) / (n @ n))
    return float(max(a, 0.0)), float(max(b, 0.0))


def fit_gather(ns: list[int], seconds: list[float]) -> float | None:
    """α of the ring all-gather, t = (N-1)·α (+ bandwidth, negligible at these few kB)."""
    x = np.asarray(ns, float) - 1
    if not len(x) or not x.any():
        return None
    return float((x @ np.asarray(seconds, float)) / (x @ x))


def extend(points: dict[int, dict[str, Any]], bandwidth_Bps: float) -> dict[str, Any]:
    ns = sorted(points)
    models: dict[str, Any] = {}
    rows: dict[int, dict[str, float | None]] = {n: {} for n in EXTEND_TO}
    gather = [(n, points[n]["gather_s"]) for n in ns if points[n].get("gather_s") is not None and n > 1]
    if gather:
        alpha = fit_gather([n for n, _ in gather], [s for _, s in gather])
        per_rank = statistics.median(points[n]["gather_bytes"] / n for n, _ in gather)
        models["gather_s"] = {"model": "(N-1)·α + (N-1)·b/B, b = bytes per rank per interval",
                              "alpha_s": alpha, "bytes_per_rank": per_rank, "bandwidth_Bps": bandwidth_Bps}
        for n in EXTEND_TO:
            rows[n]["gather_s"] = (n - 1) * alpha + (n - 1) * per_rank / bandwidth_Bps
            rows[n]["gather_bytes"] = n * per_rank
    for key in ("reduce_s", "run_dir_bytes", "run_json_bytes", "rank_files_bytes", "report_s", "group_s",
                "other_s_step", "other_s_log"):
        data = [(n, points[n][key]) for n in ns if points[n].get(key) is not None]
        fit = fit_linear([n for n, _ in data], [v for _, v in data])
        if fit is None:
            continue
        models[key] = {"model": "a + b·N", "a": fit[0], "b": fit[1]}
        for n in EXTEND_TO:
            rows[n][key] = fit[0] + fit[1] * n
    return {"models": models, "rows": {str(n): r for n, r in rows.items()}}


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


COLUMNS = (("N", "nprocs", 1, 0), ("step ms", "step_s", 1e3, 1), ("other %", "other_frac", 100, 2),
           ("other ms/step", "other_s_step", 1e3, 2), ("other ms, log step", "other_s_log", 1e3, 2),
           ("slowest rank's log step ms", "log_step_s_max", 1e3, 1), ("step max ms (median)", "step_s_max_median", 1e3, 1),
           ("gather ms/interval", "gather_s", 1e3, 1), ("gather kB", "gather_bytes", 1e-3, 1),
           ("reduce ms", "reduce_s", 1e3, 2), ("launch s", "launch_s", 1, 2), ("imports s", "imports_s", 1, 2),
           ("config s", "config_s", 1, 2), ("group s", "group_s", 1, 2), ("build s", "build_s", 1, 2),
           ("warm-up s", "warmup_s", 1, 2), ("probe s", "probe_s", 1, 2), ("to 1st step s", "to_first_step_s", 1, 1),
           ("records kB", "run_dir_bytes", 1e-3, 0), ("run.json kB", "run_json_bytes", 1e-3, 1),
           ("report s", "report_s", 1, 1))


def table(label_rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = ["variant"] + [c[0] for c in COLUMNS]
    body = [[label] + [fmt(row.get(key), scale, digits) for _, key, scale, digits in COLUMNS]
            for label, row in label_rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", default="2,4,8,16,32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--against", type=Path, default=None, help="another checkout to run the same jobs from")
    parser.add_argument("--timeout", type=float, default=900, help="per job, seconds")
    parser.add_argument("--bandwidth-GBps", type=float, default=10.0,
                        help="link bandwidth for the gather's extension to 1,024 and 8,192 ranks")
    parser.add_argument("--out", type=Path, default=Path("overhead_by_world.json"))
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    parser.add_argument("--load", type=Path, action="append", default=[],
                        help="a JSON this script wrote (repeatable): its runs join the table (--nprocs '' runs none)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="RANKS",
                        help="also grow the largest run's records to RANKS ranks and time the report over them")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every job")
    args = parser.parse_args(argv)
    variants = [("this", REPO)] + ([("against", args.against.resolve())] if args.against else [])
    root = Path(tempfile.mkdtemp(prefix="overhead-by-world-"))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    for saved in args.load:
        for name, rows in json.loads(saved.read_text())["runs"].items():
            results.setdefault(name, []).extend(rows)
    try:
        for n in (int(x) for x in args.nprocs.split(",") if x):
            for repeat in range(args.repeats):
                order = variants if repeat % 2 == 0 else variants[::-1]
                for name, checkout in order:
                    study = f"n{n}-{name}-r{repeat}"
                    row = run_job(checkout, n, args.steps, root, study, args.overrides, args.timeout)
                    row.update(variant=name, repeat=repeat)
                    results[name].append(row)
                    status = (f"other {fmt(row.get('other_frac'), 100, 2)} %, log step "
                              f"{fmt(row.get('log_step_s_max'), 1e3)} ms" if row["ok"] else row["error"][-200:])
                    print(f"  {study}: {status}", flush=True)
        synthetic = None
        done = [r for r in results["this"] if r.get("ok") and r.get("run_dir")]
        if args.synthetic and done:
            largest = max(done, key=lambda r: r["nprocs"])
            synthetic = synthetic_report(Path(largest["run_dir"]), args.synthetic, root)
            print(f"  synthetic {args.synthetic} ranks from {largest['nprocs']}: " + json.dumps(synthetic))
    finally:
        if args.keep:
            print(f"run folders in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    medians: dict[str, dict[int, dict[str, Any]]] = {}
    label_rows = []
    for name, rows in results.items():
        medians[name] = {}
        for n in sorted({r["nprocs"] for r in rows}):
            done = [r for r in rows if r["nprocs"] == n and r.get("ok")]
            if not done:
                continue
            point = {"nprocs": n, "runs": len(done)}
            point.update({key: median_of(done, key) for _, key, _, _ in COLUMNS[1:]})
            medians[name][n] = point
            label_rows.append((name if args.against else f"{name}", point))
    print(table(label_rows))
    extension = extend(medians["this"], args.bandwidth_GBps * 1e9) if medians.get("this") else {}
    if extension:
        print("\nextended (this checkout):")
        for n, row in extension["rows"].items():
            print(f"  N={n}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if v is not None))
        for key, model in extension["models"].items():
            print(f"  {key}: " + json.dumps(model))
    args.out.write_text(json.dumps({"job": JOB, "steps": args.steps, "runs": results,
                                    "medians": {k: {str(n): p for n, p in v.items()} for k, v in medians.items()},
                                    "extension": extension, "synthetic": synthetic}, indent=1))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
