"""``torchrun … -m scaling.commbench`` / ``mpiexec -n N python -m scaling.commbench``: collective microbenchmark.

Times all_reduce, all_gather, reduce_scatter and broadcast over message sizes
(powers of two between ``commbench.min_bytes`` and ``commbench.max_bytes``)
through the torch.distributed backend in use and, with ``commbench.mpi=true``,
through mpi4py on CPU buffers. Runs under torchrun, srun, mpiexec or alone.

For each (transport, op, size): one call whose result is checked (inputs are
``rank + 1``), ``warmup_iters`` untimed calls, then ``iters`` calls timed one by
one on every rank. An iteration's time is its mean over ranks (nccl-tests'
default); the reported ``time_s`` is the median over iterations. Sizes and bus
bandwidth follow nccl-tests (see ``scaling.bench.commfit``): ``algbw = bytes / time``,
``busbw = algbw · bus_factor(op, n)``.

Writes ``<paths.root>/<study.name>/<run_id>/commbench.json`` and
``commbench.png`` (bus bandwidth against message size, with the fitted α–β
model drawn over the points), and prints an nccl-tests-style table.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from scaling import compat
from scaling.bench import commfit, commplot
from scaling.config import ConfigError, DistConfig, PathsConfig, to_container
from scaling.launch import detect
from scaling.launch import group
from scaling.records import provenance
from scaling.sinks import console
from scaling.records.files import write_json

ELEMENT_BYTES = 4  # float32 everywhere, as nccl-tests' default
JSON_NAME = "commbench.json"
PNG_NAME = "commbench.png"


@dataclass(frozen=True)
class BenchConfig:
    ops: tuple[str, ...]
    """Collectives to time, from commfit.OPS."""
    min_bytes: int
    """Smallest message; sizes are the powers of two in [min_bytes, max_bytes]."""
    max_bytes: int
    """Largest message."""
    iters: int
    """Timed calls per size; the median is reported."""
    warmup_iters: int
    """Untimed calls per size before the timed ones."""
    mpi: bool
    """Also time the collectives through mpi4py (needs an MPI launch)."""

    def __post_init__(self) -> None:
        bad = [op for op in self.ops if op not in commfit.OPS]
        if not self.ops or bad:
            raise ConfigError(f"commbench.ops: unknown op {bad[0] if bad else '(none given)'!r}; "
                              f"valid: {', '.join(commfit.OPS)}")
        for key in ("min_bytes", "max_bytes", "iters", "warmup_iters"):
            value = getattr(self, key)
            lowest = 0 if key == "warmup_iters" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ConfigError(f"commbench.{key} must be an integer >= {lowest} (got {value!r})")
        if self.min_bytes < ELEMENT_BYTES:
            raise ConfigError(f"commbench.min_bytes must be >= {ELEMENT_BYTES} (one float32; got {self.min_bytes})")
        if not self.sizes_bytes():
            raise ConfigError(f"commbench.min_bytes={self.min_bytes} and commbench.max_bytes={self.max_bytes} "
                              "leave no power of two between them")
        if not isinstance(self.mpi, bool):
            raise ConfigError(f"commbench.mpi must be true or false (got {self.mpi!r})")

    def sizes_bytes(self) -> list[int]:
        size = 1 << max(0, (self.min_bytes - 1).bit_length())
        sizes = []
        while size <= self.max_bytes:
            sizes.append(size)
            size *= 2
        return sizes


@dataclass(frozen=True)
class Settings:
    bench: BenchConfig
    dist: DistConfig
    paths: PathsConfig
    study_name: str


def _section(raw: dict[str, Any], key: str, cls: type) -> Any:
    section = raw.get(key)
    if not isinstance(section, dict):
        raise ConfigError(f"config section {key!r} is missing")
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(section) - names)
    if unknown:
        raise ConfigError(f"unknown key {key}.{unknown[0]}; valid keys: {', '.join(sorted(names))}")
    try:
        return cls(**section)
    except TypeError as exc:  # a field without a default is missing
        raise ConfigError(f"{key}: {exc}") from None


def parse(cfg: DictConfig | dict[str, Any]) -> Settings:
    raw = to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    bench = dict(raw.get("commbench") or {})
    if isinstance(bench.get("ops"), (list, tuple)):
        bench["ops"] = tuple(bench["ops"])
    study_name = str((raw.get("study") or {}).get("name", "commbench"))
    if not study_name or "/" in study_name:
        raise ConfigError(f"study.name must be a plain directory name (got {study_name!r})")
    return Settings(_section({"commbench": bench}, "commbench", BenchConfig),
                    _section(raw, "dist", DistConfig), _section(raw, "paths", PathsConfig), study_name)


@dataclass(frozen=True)
class Result:
    """One row of the table: the median time of one collective at one size."""

    op: str
    transport: str
    """torch (the process group's backend) or mpi (mpi4py)."""
    bytes: int
    world_size: int
    time_s: float

    @property
    def count(self) -> int:
        return self.bytes // ELEMENT_BYTES

    @property
    def algbw_GBps(self) -> float:
        return self.bytes / self.time_s / 1e9

    @property
    def busbw_GBps(self) -> float:
        return self.algbw_GBps * commfit.bus_factor(self.op, self.world_size)

    def record(self) -> dict[str, Any]:
        return {"op": self.op, "bytes": self.bytes, "time_s": self.time_s, "algbw_GBps": self.algbw_GBps,
                "busbw_GBps": self.busbw_GBps, "transport": self.transport}


def message_bytes(op: str, size_bytes: int, world_size: int) -> int:
    """The size actually moved: gathered/scattered totals are whole float32 chunks per rank (nccl-tests' rule)."""
    if op in ("all_gather", "reduce_scatter"):
        chunk = ELEMENT_BYTES * world_size
        return size_bytes // chunk * chunk
    return size_bytes // ELEMENT_BYTES * ELEMENT_BYTES


@dataclass
class Case:
    """Buffers of one (transport, op, size) and the call that runs the collective on them."""

    call: Callable[[], None]
    """One collective, complete on return."""
    fill: Callable[[float], None]
    """Set every input element to a value."""
    output: Callable[[], np.ndarray]
    """The output buffer as a CPU array."""


def expected_output(op: str, world_size: int, elements: int) -> np.ndarray:
    """What each rank's output holds when every rank's input is ``rank + 1``."""
    n = world_size
    if op in ("all_reduce", "reduce_scatter"):
        count = elements if op == "all_reduce" else elements // n
        return np.full(count, n * (n + 1) / 2, dtype=np.float32)
    if op == "all_gather":
        return np.repeat(np.arange(1, n + 1, dtype=np.float32), elements // n)
    return np.ones(elements, dtype=np.float32)  # broadcast from rank 0


def torch_case(op: str, elements: int, world_size: int, device: torch.device) -> Case:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    per_rank = elements // world_size
    if op == "all_reduce":
        buf = torch.empty(elements, dtype=torch.float32, device=device)
        inp, out, run = buf, buf, lambda: dist.all_reduce(buf)
    elif op == "all_gather":
        inp = torch.empty(per_rank, dtype=torch.float32, device=device)
        out = torch.empty(elements, dtype=torch.float32, device=device)
        run = lambda: compat.all_gather_into(out, inp)  # noqa: E731
    elif op == "reduce_scatter":
        inp = torch.empty(elements, dtype=torch.float32, device=device)
        out = torch.empty(per_rank, dtype=torch.float32, device=device)
        run = lambda: compat.reduce_scatter_into(out, inp)  # noqa: E731
    else:
        buf = torch.empty(elements, dtype=torch.float32, device=device)
        inp, out, run = buf, buf, lambda: dist.broadcast(buf, src=0)

    def call() -> None:
        run()
        sync()

    return Case(call, lambda value: inp.fill_(value), lambda: out.cpu().numpy())


def mpi_case(op: str, elements: int, world_size: int) -> Case:
    from scaling.launch import mpi

    MPI = mpi.load_mpi()
    comm = MPI.COMM_WORLD
    per_rank = elements // world_size
    if op == "all_reduce":
        buf = np.empty(elements, dtype=np.float32)
        inp, out = buf, buf
        call = lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)  # noqa: E731
    elif op == "all_gather":
        inp, out = np.empty(per_rank, dtype=np.float32), np.empty(elements, dtype=np.float32)
        call = lambda: comm.Allgather(inp, out)  # noqa: E731
    elif op == "reduce_scatter":
        inp, out = np.empty(elements, dtype=np.float32), np.empty(per_rank, dtype=np.float32)
        call = lambda: comm.Reduce_scatter_block(inp, out, op=MPI.SUM)  # noqa: E731
    else:
        buf = np.empty(elements, dtype=np.float32)
        inp, out = buf, buf
        call = lambda: comm.Bcast(buf, root=0)  # noqa: E731
    return Case(call, lambda value: inp.fill(value), lambda: out)


def measure(ctx: group.Context, case: Case, op: str, transport: str, size_bytes: int,
            bench: BenchConfig) -> Result:
    """Check one call's result, warm up, then time ``iters`` calls; the same on every rank."""
    case.fill(float(ctx.rank + 1))
    case.call()
    got = case.output()
    wrong = int(not np.array_equal(got, expected_output(op, ctx.world_size, size_bytes // ELEMENT_BYTES)))
    wrong_ranks = ctx.gather_tensor(torch.tensor([wrong])).flatten().nonzero().flatten().tolist()
    if wrong_ranks:
        raise RuntimeError(f"{transport} {op} of {size_bytes} B gave a wrong result on rank(s) {wrong_ranks}")
    case.fill(0.0)  # repeated in-place sums of zeros stay finite
    for _ in range(bench.warmup_iters):
        case.call()
    dist.barrier(group=ctx.meta_group)
    times_s = []
    for _ in range(bench.iters):
        start = time.perf_counter()
        case.call()
        times_s.append(time.perf_counter() - start)
    per_rank = ctx.gather_tensor(torch.tensor(times_s, dtype=torch.float64))  # (ranks, iters)
    median_s = statistics.median(per_rank.mean(dim=0).tolist())
    return Result(op, transport, size_bytes, ctx.world_size, median_s)


TABLE_HEADER = (f"#{'transport':>10} {'op':>15} {'size(B)':>12} {'count':>11} {'type':>6} "
                f"{'time(us)':>10} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12}")


def table_row(result: Result) -> str:
    return (f" {result.transport:>10} {result.op:>15} {result.bytes:>12} {result.count:>11} {'float':>6} "
            f"{result.time_s * 1e6:>10.1f} {result.algbw_GBps:>12.4f} {result.busbw_GBps:>12.4f}")


def fit_line(fit: commfit.Fit) -> str:
    bandwidth = "unbounded" if fit.bandwidth_GBps is None else f"{fit.bandwidth_GBps:.4f} GB/s"
    return (f"# fit {fit.transport:>6} {fit.op:>15}: alpha {fit.alpha_s * 1e6:8.2f} us, B {bandwidth}"
            f" (rms error {fit.rms_rel_error:.1%})")


def fits_of(results: list[Result], world_size: int) -> list[commfit.Fit]:
    fits = []
    for transport in dict.fromkeys(r.transport for r in results):
        for op in dict.fromkeys(r.op for r in results if r.transport == transport):
            rows = [r for r in results if r.transport == transport and r.op == op]
            fitted = commfit.fit(op, transport, world_size, [r.bytes for r in rows], [r.time_s for r in rows])
            if fitted is not None:
                fits.append(fitted)
    return fits


def run_benchmark(settings: Settings) -> dict[str, Any]:
    """The whole benchmark on this rank; returns commbench.json's content (on every rank)."""
    bench = settings.bench
    launch = detect.detect()
    if bench.mpi and launch.launcher != "mpi":
        raise ConfigError(f"commbench.mpi=true needs an MPI launch (mpiexec -n N python -m scaling.commbench ...); "
                          f"this job was launched by {launch.launcher}")
    log = console.make_logger(launch.rank, True)
    ctx = group.init(launch, settings.dist)
    try:
        run_dir = ctx.agree_on_run_dir(Path(settings.paths.root) / settings.study_name, settings.paths.run_id,
                                       f"commbench-n{ctx.world_size}")
        n = ctx.world_size
        log.info(f"# commbench: {n} ranks on {ctx.nodes} node(s), backend {ctx.backend}, launcher "
                 f"{launch.launcher}, {bench.iters} timed + {bench.warmup_iters} warm-up calls per size")
        log.info(TABLE_HEADER)
        transports = ["torch"] + (["mpi"] if bench.mpi else [])
        results: list[Result] = []
        for transport in transports:
            for op in bench.ops:
                for size in bench.sizes_bytes():
                    size_bytes = message_bytes(op, size, n)
                    if size_bytes == 0:
                        continue
                    elements = size_bytes // ELEMENT_BYTES
                    case = (torch_case(op, elements, n, ctx.device) if transport == "torch"
                            else mpi_case(op, elements, n))
                    result = measure(ctx, case, op, transport, size_bytes, bench)
                    results.append(result)
                    log.info(table_row(result))
        fits = fits_of(results, n)
        for fitted in fits:
            log.info(fit_line(fitted))
        record = {
            "run_id": run_dir.name,
            "backend": ctx.backend,
            "world_size": n,
            "nodes": ctx.nodes,
            "launcher": launch.launcher,
            "device": str(ctx.device),
            "dtype": "float32",
            "iters": bench.iters,
            "warmup_iters": bench.warmup_iters,
            "timing": "time_s = median over iterations of the mean over ranks",
            "results": [r.record() for r in results],
            "fit": [f.record() for f in fits],
            "plot": PNG_NAME,
            "provenance": provenance.collect(ctx.device, ctx.hostnames),
        }
        if bench.mpi:
            from scaling.launch import mpi

            record["mpi_library"] = mpi.library_version()
        if ctx.is_main:
            write_json(run_dir / JSON_NAME, record)
            commplot.plot_busbw(results, fits, run_dir / PNG_NAME,
                                title=f"{n} ranks, {ctx.nodes} node(s), backend {ctx.backend}, launcher {launch.launcher}")
            log.info(f"# records: {run_dir / JSON_NAME}, {run_dir / PNG_NAME}")
        dist.barrier(group=ctx.meta_group)
        return record
    finally:
        group.teardown(ctx)


def main(cfg: DictConfig) -> int:
    run_benchmark(parse(cfg))
    return 0

