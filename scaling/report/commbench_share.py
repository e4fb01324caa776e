"""A commbench result beside a study: how close the training job's all-reduce came to the benchmark.

``python -m scaling.report runs/<study> --commbench runs/commbench/<run_id>`` reads
the benchmark's ``commbench.json`` and, for every multi-process world size of the
study, compares the bus bandwidth of the gradient all-reduce (run.json
``summary.busbw_GBps``: the bytes the hook sent over the union of the all-reduce
intervals, times 2(n-1)/n) with what commbench measured for one all-reduce of the
run's mean message size (``summary.comm_wire_bytes / summary.comm_buckets``).
Both sides count the bytes really sent, so a compressing hook (fp16, bf16,
powersgd) is not credited with bandwidth it did not use; records older than
``comm_wire_bytes`` are corrected for fp16/bf16 from the hook's name
(``RunRecord.busbw_GBps``), and left out for powersgd, whose wire bytes they cannot tell:

- the reference is the fitted alpha-beta model of op ``all_reduce``, transport
  ``torch`` (``scaling.bench.commfit``), evaluated at the mean bucket size; without a
  fit, the nearest measured message size (on a log scale) stands in for it;
- ``fraction = busbw reached by the runs / reference``.

A commbench result is used for a world size only when its world size and
torch.distributed backend are those of the runs; a result from the same number
of nodes is preferred. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.bench import commfit
from scaling.report.study_folder import RunRecord

JSON_NAME = "commbench.json"
"""As scaling.commbench writes it (that module imports torch, so the name is repeated here)."""
OP, TRANSPORT = "all_reduce", "torch"


class CommbenchError(ValueError):
    """A --commbench path that is not a readable commbench result."""


@dataclass(frozen=True)
class Bench:
    """The all_reduce part of one commbench.json."""

    path: Path
    """The commbench.json file, as given on the command line (or found under the folder given)."""
    run_id: str
    backend: str
    world_size: int
    nodes: int | None
    points: tuple[tuple[int, float], ...]
    """(message bytes, bus bandwidth in GB/s) of every measured all_reduce over torch, by size."""
    fit: commfit.Fit | None
    plot: Path | None

    @property
    def folder(self) -> Path:
        return self.path.parent

    def describe(self) -> str:
        nodes = f", {self.nodes} node(s)" if self.nodes is not None else ""
        return f"{self.world_size} ranks on {self.backend}{nodes}"


@dataclass(frozen=True)
class AtBucket:
    """The bandwidth reached against commbench's at one message size."""

    bucket_bytes: float
    reached_GBps: float
    model_GBps: float | None
    """The fitted model at ``bucket_bytes``; None without a fit."""
    nearest_bytes: int | None
    nearest_GBps: float | None
    """The measured point whose size is nearest to ``bucket_bytes`` on a log scale."""
    reference_GBps: float
    """The model when there is one, else the nearest measured point."""
    fraction: float
    """reached / reference."""
    extrapolated: bool
    """The bucket size lies outside the measured sizes: the model is used beyond its data."""


@dataclass(frozen=True)
class SizeComparison:
    """One world size of one study against the commbench result that matches it (if any)."""

    study: str
    world_size: int
    backend: str | None
    nodes: int | None
    bench: Bench | None
    at: AtBucket | None
    problem: str | None
    """Why there is no comparison (no matching commbench, no all-reduce measured)."""


# -- the arithmetic ---------------------------------------------------------------------------


def mean_bucket_bytes(comm_bytes: float, comm_buckets: float) -> float:
    """Gradient bytes per all-reduce call of one step."""
    if comm_buckets <= 0:
        raise ValueError(f"comm_buckets must be > 0 (got {comm_buckets})")
    return comm_bytes / comm_buckets


def nearest_point(points: Sequence[tuple[int, float]], size_bytes: float) -> tuple[int, float] | None:
    """The measured (bytes, busbw) whose size is nearest to ``size_bytes`` on a log scale (sizes are powers of two)."""
    usable = [p for p in points if p[0] > 0]
    if not usable or size_bytes <= 0:
        return None
    return min(usable, key=lambda p: abs(math.log(p[0]) - math.log(size_bytes)))


def at_bucket(reached_GBps: float, bucket_bytes: float, fit: commfit.Fit | None,
              points: Sequence[tuple[int, float]]) -> AtBucket | None:
    """``reached_GBps`` as a fraction of commbench's bus bandwidth at ``bucket_bytes``; None with nothing to compare."""
    model = fit.busbw_GBps(bucket_bytes) if fit is not None else None
    if model is not None and not (math.isfinite(model) and model > 0):
        model = None
    nearest = nearest_point(points, bucket_bytes)
    reference = model if model is not None else (nearest[1] if nearest else None)
    if reference is None or reference <= 0:
        return None
    sizes = [p[0] for p in points]
    outside = bool(sizes) and not (min(sizes) <= bucket_bytes <= max(sizes))
    return AtBucket(bucket_bytes, reached_GBps, model, nearest[0] if nearest else None,
                    nearest[1] if nearest else None, reference, reached_GBps / reference, outside)


# -- reading commbench.json -------------------------------------------------------------------


def _fit_of(data: dict[str, Any], world_size: int, times: Sequence[tuple[int, float]]) -> commfit.Fit | None:
    for entry in data.get("fit") or []:
        if isinstance(entry, dict) and entry.get("op") == OP and entry.get("transport") == TRANSPORT:
            bandwidth = entry.get("bandwidth_GBps")
            return commfit.Fit(OP, TRANSPORT, world_size, float(entry["alpha_s"]),
                               None if bandwidth is None else float(bandwidth),
                               float(entry.get("rms_rel_error", math.nan)))
    # An older or hand-made record without the fit: fit the same model to its points.
    if not times:
        return None
    return commfit.fit(OP, TRANSPORT, world_size, [s for s, _ in times], [t for _, t in times])


def read_bench(path: Path) -> Bench:
    """One commbench.json; CommbenchError names the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CommbenchError(f"{path} cannot be read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise CommbenchError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CommbenchError(f"{path} is not a JSON object")
    world_size, backend = data.get("world_size"), data.get("backend")
    if (not isinstance(world_size, int) or isinstance(world_size, bool) or not isinstance(backend, str)
            or not isinstance(data.get("results"), list)):
        raise CommbenchError(f"{path} lacks world_size, backend or results: not a commbench result")
    rows = [r for r in data.get("results") or [] if isinstance(r, dict)
            and r.get("op") == OP and r.get("transport", TRANSPORT) == TRANSPORT]
    try:
        points = sorted((int(r["bytes"]), float(r["busbw_GBps"])) for r in rows)
        times = sorted((int(r["bytes"]), float(r["time_s"])) for r in rows)
        fit = _fit_of(data, world_size, times)
    except (KeyError, TypeError, ValueError) as exc:
        raise CommbenchError(f"{path}: an all_reduce result or fit entry is malformed ({exc})") from None
    plot = path.parent / str(data.get("plot") or "commbench.png")
    nodes = data.get("nodes")
    return Bench(path, str(data.get("run_id") or path.parent.name), backend, world_size,
                 nodes if isinstance(nodes, int) else None, tuple(points), fit, plot if plot.is_file() else None)


def load(paths: Sequence[Path]) -> list[Bench]:
    """Each path: a commbench.json, its run folder, or a folder of commbench runs (every one under it, the
    newest run id first, so that the newest is the one matched)."""
    benches: list[Bench] = []
    for given in map(Path, paths):
        if given.is_file():
            files = [given]
        elif (given / JSON_NAME).is_file():
            files = [given / JSON_NAME]
        elif given.is_dir():
            files = sorted((p / JSON_NAME for p in given.iterdir() if (p / JSON_NAME).is_file()), reverse=True)
            if not files:
                raise CommbenchError(f"--commbench {given}: no {JSON_NAME} in it or in its subfolders "
                                     "(expected a commbench.json, its run folder, or a folder of commbench runs)")
        else:
            raise CommbenchError(f"--commbench {given}: no such file or directory")
        benches += [read_bench(f) for f in files]
    return benches


# -- matching studies and benchmarks ----------------------------------------------------------


def _median(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(present) if present else None


def run_bucket_bytes(run: RunRecord) -> float | None:
    """Bytes on the wire per all-reduce call (the message size commbench is read at)."""
    wire, buckets = run.wire_bytes(), run.number("comm_buckets")
    if wire is None or buckets is None or buckets <= 0:
        return None
    return mean_bucket_bytes(wire, buckets)


def match(benches: Sequence[Bench], world_size: int, backend: str | None, nodes: int | None) -> Bench | None:
    """The first given result of this world size and backend, one of the same node count first."""
    same = [b for b in benches if b.world_size == world_size and b.backend == backend]
    return next((b for b in same if nodes is not None and b.nodes == nodes), same[0] if same else None)


def compare_runs(study: str, world_size: int, runs: Sequence[RunRecord], benches: Sequence[Bench]) -> SizeComparison:
    """The completed runs of one world size (medians over repeats) against their commbench result."""
    done = [r for r in runs if r.completed]
    backend = next((str(r.run["backend"]) for r in done if r.run.get("backend")), None)
    nodes = next((r.nodes for r in done if r.nodes is not None), None)
    bench = match(benches, world_size, backend, nodes)

    def without(problem: str) -> SizeComparison:
        return SizeComparison(study, world_size, backend, nodes, bench, None, problem)

    if bench is None:
        given = "; ".join(f"{b.describe()} ({b.folder})" for b in benches)
        return SizeComparison(study, world_size, backend, nodes, None, None,
                              f"no commbench result with world size {world_size} and backend {backend or '?'} "
                              f"among those given ({given}); run scaling.commbench with {world_size} ranks "
                              "to compare")
    reached = _median([r.busbw_GBps() for r in done])
    bucket = _median([run_bucket_bytes(r) for r in done])
    if reached is None or bucket is None:
        if any(r.number("comm_bytes") is not None for r in done):
            hooks = sorted({str(r.run.get("comm_hook")) for r in done})
            return without(f"the runs lack comm_wire_bytes and their hook ({', '.join(hooks)}) compresses by an "
                           "unknown factor: the bytes really sent are not known")
        return without("the runs record no gradient all-reduce (summary.busbw_GBps, comm_bytes, comm_buckets)")
    found = at_bucket(reached, bucket, bench.fit, bench.points)
    if found is None:
        return without(f"{bench.path} has no all_reduce result over torch to compare with")
    return SizeComparison(study, world_size, backend, nodes, bench, found, None)


def compare_study(study: str, runs: Sequence[RunRecord], benches: Sequence[Bench]) -> list[SizeComparison]:
    """Every world size above one with a completed run."""
    sizes = sorted({r.world_size for r in runs if r.completed and r.world_size > 1})
    return [compare_runs(study, n, [r for r in runs if r.world_size == n], benches) for n in sizes]


def per_run(run: RunRecord, benches: Sequence[Bench]) -> tuple[Bench, AtBucket] | None:
    """One run's own bandwidth and bucket size against its commbench result (for results.csv)."""
    if not run.completed or run.world_size < 2:
        return None
    bench = match(benches, run.world_size, run.run.get("backend"), run.nodes)
    reached, bucket = run.busbw_GBps(), run_bucket_bytes(run)
    if bench is None or reached is None or bucket is None:
        return None
    found = at_bucket(float(reached), bucket, bench.fit, bench.points)
    return (bench, found) if found else None


# -- words ------------------------------------------------------------------------------------


def gbps(value: float) -> str:
    return f"{value:.2f}" if value >= 0.995 else f"{value:.2g}"


def size_text(n_bytes: float) -> str:
    """Decimal units, as GB/s is."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def finding(c: SizeComparison) -> str:
    """One line per world size, e.g. "n2: all-reduce reached 0.66 GB/s, 94% of commbench's 0.70 GB/s at 33.5 MB
    buckets (...)"."""
    if c.at is None:
        return f"n{c.world_size}: {c.problem}."
    a, bench = c.at, c.bench
    assert bench is not None
    if a.model_GBps is not None:
        basis = "fitted model"
        if a.nearest_bytes is not None:
            basis += f"; measured {gbps(a.nearest_GBps)} GB/s at {size_text(a.nearest_bytes)}"
    else:
        basis = "nearest measured size, no fit"
    if a.extrapolated:
        sizes = [p[0] for p in bench.points]
        basis += (f"; beyond the sizes measured ({size_text(min(sizes))} to {size_text(max(sizes))}), "
                  "so the model is extrapolated")
    if c.nodes is not None and bench.nodes is not None and c.nodes != bench.nodes:
        basis += f"; commbench ran on {bench.nodes} node(s), the runs on {c.nodes}"
    return (f"n{c.world_size}: all-reduce reached {gbps(a.reached_GBps)} GB/s, {100 * a.fraction:.0f}% of "
            f"commbench's {gbps(a.reference_GBps)} GB/s at {size_text(a.bucket_bytes)} buckets "
            f"({basis}; {bench.folder})")


def study_lines(comparisons: Sequence[SizeComparison]) -> list[str]:
    if not comparisons:
        return ["No multi-process run completed: there is no all-reduce to set beside commbench."]
    return [finding(c) for c in comparisons]


def fit_text(bench: Bench) -> str:
    if bench.fit is None:
        return "no fit"
    bandwidth = "unbounded" if bench.fit.bandwidth_GBps is None else f"{bench.fit.bandwidth_GBps:.3g} GB/s"
    return f"alpha {bench.fit.alpha_s * 1e6:.1f} us, B {bandwidth}"


def relative(path: Path, out_dir: Path) -> str:
    """A link from the report folder to ``path`` (forward slashes, as Markdown and HTML want)."""
    return Path(os.path.relpath(Path(path).absolute(), Path(out_dir).absolute())).as_posix()


TABLE_HEADERS = ("world size", "backend", "mean bucket", "all-reduce busbw (GB/s)", "commbench busbw (GB/s)",
                 "measured nearest", "reached", "commbench")


def table(comparisons: Sequence[SizeComparison], several: bool) -> tuple[list[str], list[list[str]]]:
    """The comparison per study and world size; the last cell is the commbench run folder."""
    headers = (["study"] if several else []) + list(TABLE_HEADERS)
    rows = []
    for c in comparisons:
        a = c.at
        row = [c.study] if several else []
        row += [str(c.world_size), c.backend or "-", size_text(a.bucket_bytes) if a else "-",
                gbps(a.reached_GBps) if a else "-", gbps(a.reference_GBps) if a else "-",
                f"{gbps(a.nearest_GBps)} at {size_text(a.nearest_bytes)}" if a and a.nearest_bytes else "-",
                f"{100 * a.fraction:.0f}%" if a else "-", str(c.bench.folder) if c.bench else "none matches"]
        rows.append(row)
    return headers, rows
