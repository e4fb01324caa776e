"""One prediction run: the link, the predictions over world sizes, the table, prediction.json and .png."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.predict.events import Link, Links
from scaling.predict.model import (ASSUMPTIONS, Prediction, Target, crossover, extrapolation_warning,
                                   fit_from_points, predict, with_efficiency)
from scaling.predict.runs import Point, find_points
from scaling.records.files import read_json, write_json

PREDICTION_JSON = "prediction.json"
PREDICTION_PNG = "prediction.png"
COMMBENCH_JSON = "commbench.json"
RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
RATE_SCALE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
LATENCY = re.compile(r"^(\d+(?:\.\d+)?(?:e-?\d+)?)(s|ms|us|ns)?$")
LATENCY_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_rate_bit_s(text: str) -> float | None:
    """``100mbit`` -> 1e8 bit/s; ``unlimited`` -> None (no bandwidth term)."""
    if text.lower() in ("unlimited", "inf"):
        return None
    match = RATE.match(text.lower())
    if not match:
        raise ValueError(f"rate {text!r}: give NUMBER with bit|kbit|mbit|gbit (e.g. 100mbit), or unlimited")
    return float(match[1]) * RATE_SCALE[match[2]]


def parse_latency_s(text: str) -> float:
    match = LATENCY.match(text.lower())
    if not match:
        raise ValueError(f"latency {text!r}: give NUMBER with s|ms|us|ns (e.g. 50us)")
    return float(match[1]) * LATENCY_SCALE[match[2] or "s"]


@dataclass
class PredictOptions:
    runs: list[Path]
    nprocs: list[int] | None = None
    commbench: list[Path] | None = None
    """commbench.json files, their run folders, or folders of such runs: one fit per world size."""
    link_bit_s: float | None = None
    link_latency_s: float | None = None
    link_given: bool = False
    measured_link_bit_s: float | None = None
    bucket_cap_mb: float | None = None
    hook: str | None = None
    global_batch: int | None = None
    out: Path | None = None
    write: bool = True


@dataclass
class Result:
    predictions: list[Prediction]
    points: list[Point]
    link: Link | Links
    record: dict[str, Any]
    table: str
    """The prediction table and its notes, as the console and the report's Prediction section show them."""
    out_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """prediction.json and prediction.png, where they were written."""
        return [] if self.out_dir is None else [self.out_dir / PREDICTION_JSON, self.out_dir / PREDICTION_PNG]

    @property
    def text(self) -> str:
        """What ``scaling.predict`` prints: the table, then the files written (if any)."""
        return self.table + (f"\n\n  written: {', '.join(map(str, self.files))}" if self.files else "")


def commbench_fit(path: Path) -> tuple[int, Link]:
    """(world size, α and B of the all-reduce fit, torch transport) of one commbench.json or its run folder."""
    path = path / COMMBENCH_JSON if path.is_dir() else path
    record = read_json(path)
    world_size = int(record.get("world_size") or 0)
    for entry in record.get("fit") or []:
        if entry.get("op") == "all_reduce" and entry.get("transport", "torch") == "torch":
            bandwidth = entry.get("bandwidth_GBps")
            rms = entry.get("rms_rel_error")
            spread = f", rms error {100 * float(rms):.0f}%" if rms is not None else ""
            return world_size, Link(float(entry["alpha_s"]),
                                    math.inf if bandwidth is None else float(bandwidth) * 1e9,
                                    f"commbench fit at {world_size} ranks ({path}{spread})")
    raise ValueError(f"{path}: no all_reduce fit in commbench.json")


def commbench_files(path: Path) -> list[Path]:
    """The commbench.json of a file, a run folder, or every run folder one level down."""
    if path.is_file():
        return [path]
    if (path / COMMBENCH_JSON).exists():
        return [path / COMMBENCH_JSON]
    found = sorted(path.glob(f"*/{COMMBENCH_JSON}")) if path.is_dir() else []
    if not found:
        raise ValueError(f"--commbench {path}: no {COMMBENCH_JSON} there or one level down")
    return found


def commbench_links(paths: list[Path]) -> tuple[Link | Links, list[str]]:
    """One all-reduce fit per world size from commbench records (the newest where several share one)."""
    files = sorted((f for p in paths for f in commbench_files(p)), key=lambda f: f.stat().st_mtime)
    fits: dict[int, Link] = {}
    notes = []
    for f in files:  # oldest first: a newer record at the same world size replaces an older one
        world_size, link = commbench_fit(f)
        if world_size in fits:
            notes.append(f"two commbench records at {world_size} ranks: the newer one is used ({f})")
        fits[world_size] = link
    if len(fits) == 1:
        return next(iter(fits.values())), notes
    return Links(tuple(sorted(fits.items()))), notes


def resolve_link(options: PredictOptions, points: list[Point]) -> tuple[Link | Links, list[str]]:
    notes: list[str] = []
    if options.commbench:
        return commbench_links(options.commbench)
    fitted = fit_from_points(points)
    if fitted is None and not options.link_given:
        raise ValueError("no bucket timeline (buckets.json) in the runs to fit the link on; give --link or --commbench")
    if fitted is not None and fitted[0] == 0.0:
        notes.append("the runs cannot tell latency from bandwidth (one world size, one busy period each): "
                     "latency 0, all of the measured time on the bandwidth term")
    if not options.link_given:
        alpha, bandwidth = fitted
        return Link(alpha, bandwidth, f"fitted on the runs' last-arrival bucket times (alpha {alpha * 1e6:.0f} us, "
                                      f"B {bandwidth / 1e6:.1f} MB/s)"), notes
    alpha = options.link_latency_s if options.link_latency_s is not None else (fitted[0] if fitted else 0.0)
    if options.link_bit_s is None:
        return Link(alpha, math.inf, "unlimited link: latency terms only"), notes
    share = 1.0
    if options.measured_link_bit_s is not None and fitted is not None:
        share = fitted[1] * 8 / options.measured_link_bit_s
        notes.append(f"the runs achieved {100 * share:.0f}% of their {options.measured_link_bit_s / 1e6:g} Mbit/s "
                     "link; the same share is assumed on the target link")
    bandwidth = share * options.link_bit_s / 8
    return Link(alpha, bandwidth, f"link {options.link_bit_s / 1e6:g} Mbit/s (B {bandwidth / 1e6:.1f} MB/s), "
                                  f"alpha {alpha * 1e6:.0f} us"), notes


def strong_global_batch(options: PredictOptions, points: list[Point]) -> int | None:
    if options.global_batch is not None:
        return options.global_batch
    strong = [p for p in points if p.kind == "strong" and not p.is_control]
    return strong[0].batch_per_rank * strong[0].world_size if strong else None


def default_nprocs(points: list[Point]) -> list[int]:
    high = max([p.world_size for p in points if not p.is_control] or [1])
    out, n = [], 1
    while n <= 8 * high:
        out.append(n)
        n *= 2
    return sorted(set(out) | {p.world_size for p in points if not p.is_control})


def run_prediction(options: PredictOptions) -> Result:
    points = find_points(options.runs)
    if not points:
        raise ValueError(f"no completed run in {', '.join(map(str, options.runs))}")
    link, notes = resolve_link(options, points)
    global_batch = strong_global_batch(options, points)
    template = Target(2, link, options.bucket_cap_mb, options.hook, global_batch)
    nprocs = options.nprocs or default_nprocs(points)
    predictions = [predict(points, Target(n, link, options.bucket_cap_mb, options.hook, global_batch)) for n in nprocs]
    measured_sizes = sorted({p.world_size for p in points if not p.is_control})
    baseline = predict(points, Target(measured_sizes[0], link, options.bucket_cap_mb, options.hook, global_batch))
    with_efficiency(predictions, baseline, strong=global_batch is not None)
    turns = crossover(points, template)
    warnings = [w for w in (extrapolation_warning(points, n) for n in nprocs) if w]
    record = {
        "inputs": [str(p.folder) for p in points],
        "kind": "strong" if global_batch is not None else "weak",
        "global_batch": global_batch,
        "link": link_record(link),
        "bucket_cap_mb": options.bucket_cap_mb, "hook": options.hook,
        "baseline_world_size": measured_sizes[0],
        "communication_bound_from_world_size": turns,
        "predictions": [p.record() for p in predictions],
        "measured": [measured_record(p) for p in points if not p.is_control],
        "assumptions": list(ASSUMPTIONS), "notes": notes, "warnings": warnings,
    }
    out_dir = None
    if options.write:
        out_dir = options.out or output_dir(options.runs)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / PREDICTION_JSON, record)
        plot(out_dir / PREDICTION_PNG, record)
    return Result(predictions, points, link, record, render_text(predictions, record), out_dir, warnings)


def link_record(link: Link | Links) -> dict[str, Any]:
    if isinstance(link, Links):
        return {"source": link.source, "by_world_size": [{"world_size": n, **link_record(one)}
                                                         for n, one in link.by_world_size]}
    return {"alpha_s": link.alpha_s, "bandwidth_Bps": None if math.isinf(link.bandwidth_Bps) else link.bandwidth_Bps,
            "source": link.source}


def measured_record(p: Point) -> dict[str, Any]:
    return {"world_size": p.world_size, "batch_per_rank": p.batch_per_rank, "step_s": p.step_s,
            "comm_exposed_s": p.get("comm_exposed_s"), "hook": p.hook, "bucket_cap_mb": p.bucket_cap_mb,
            "run": p.folder.name}


def output_dir(runs: list[Path]) -> Path:
    first = runs[0]
    return first.parent if (first / "run.json").exists() else first


def render_text(predictions: list[Prediction], record: dict[str, Any]) -> str:
    lines = [f"prediction ({record['kind']} scaling; {record['link']['source']})", "",
             f"  {'procs':>5} {'batch':>6} {'step_s':>9} {'compute_s':>9} {'exposed_s':>9} {'comm_s':>9} "
             f"{'effic.':>6}  bound"]
    for p in predictions:
        eff = f"{100 * p.efficiency:5.0f}%" if p.efficiency is not None else "     -"
        lines.append(f"  {p.world_size:>5} {p.batch_per_rank:>6} {p.step_s:9.4f} {p.compute_s:9.4f} "
                     f"{p.comm_exposed_s:9.4f} {p.comm_s:9.4f} {eff}  {p.bound}")
    turns = record["communication_bound_from_world_size"]
    lines += ["", f"  communication-bound from {turns} processes" if turns else
              "  not communication-bound at any world size up to 65536"]
    sources = sorted({p.compute_source for p in predictions})
    lines += ["", "  compute: " + "; ".join(sources)]
    lines += ["", "  the model assumes:"] + [f"    - {a}" for a in record["assumptions"]]
    lines += [f"  note: {n}" for n in [*record["notes"], *dict.fromkeys(n for p in predictions for n in p.notes)]]
    lines += [f"  WARNING: {w}" for w in record["warnings"]]
    return "\n".join(lines)


def plot(path: Path, record: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = record["predictions"]
    sizes = [p["world_size"] for p in predicted]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(sizes, [p["step_s"] for p in predicted], "-", color="C0", label="predicted step_s")
    ax.plot(sizes, [p["comm_exposed_s"] for p in predicted], "--", color="C3", label="predicted exposed comm")
    measured = record["measured"]
    ax.plot([m["world_size"] for m in measured], [m["step_s"] for m in measured], "o", color="C0",
            label="measured step_s")
    ax.plot([m["world_size"] for m in measured], [m["comm_exposed_s"] for m in measured], "x", color="C3",
            label="measured exposed comm")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("processes (world size)")
    ax.set_ylabel("seconds per step")
    ax.set_title(f"Predicted {record['kind']} scaling\n{record['link']['source']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
