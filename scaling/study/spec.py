"""What a study is, checked before anything runs: its points, its settings, and how each point is configured.

A ``StudySpec`` comes from the composed config (``spec_from_config``); every mistake in the study's input is
one ``ConfigError`` here. A ``Point`` is one training job of the study: world size N and repeat r
(``n<N>-r<r>``), or a single-process control at a per-rank batch (``solo-b<B>-r<r>``). ``job_overrides`` is
what the point's job is given; ``check_resumable`` refuses to continue a study under other settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from scaling import cli, config
from scaling.config import ConfigError
from scaling.launch.threads import resolve_threads
from scaling.records.files import flatten, previous_json
from scaling.study import slurm

KINDS = ("strong", "weak")
LAUNCHERS = ("auto", "torchrun", "srun")
STUDY_JSON = "study.json"
# Keys the study sets for every point; the user's values for them are replaced.
POINT_KEYS = ("study.name", "paths.root", "paths.run_id", "dist.threads", "train.global_batch_size")
# A control point sets the per-rank batch itself as well.
CONTROL_KEYS = (*POINT_KEYS, "train.batch_size")
# Keys that may change when a study is resumed (extending it is fine); any other difference is refused.
RESUMABLE_KEYS = ("study.nprocs", "study.nodes", "study.repeats", "study.fail_fast", "study.controls", "paths.", "logger.")


@dataclass(frozen=True)
class Point:
    world_size: int
    repeat: int
    solo_batch: int | None = None
    """Set for a single-process control point: its per-rank batch."""

    @property
    def is_control(self) -> bool:
        return self.solo_batch is not None

    @property
    def run_id(self) -> str:
        if self.solo_batch is not None:
            return f"solo-b{self.solo_batch}-r{self.repeat}"
        return f"n{self.world_size}-r{self.repeat}"

    @property
    def group(self) -> str:
        """Points that take about as long as each other (for the time estimate)."""
        return "solo" if self.is_control else f"n{self.world_size}"

    def describe(self) -> str:
        if self.solo_batch is not None:
            return f"solo control (1 process, no peer) at per-rank batch {self.solo_batch}"
        return f"{self.world_size} process(es)"


@dataclass(frozen=True)
class StudySpec:
    """A validated study definition: what runs, where, with which settings."""

    name: str
    kind: str
    """strong (fixed global batch) | weak (fixed per-rank batch)."""
    exp: str
    nprocs: tuple[int, ...]
    """World sizes, ascending, each once."""
    repeats: int
    fail_fast: bool
    threads_per_process: int
    """Intra-op threads of every process at every point."""
    global_batch_size: int | None
    """Strong scaling: the fixed global batch."""
    batch_size_per_rank: int | None
    """Weak scaling: the fixed per-rank batch."""
    root: Path
    user_overrides: tuple[str, ...]
    """The user's Hydra overrides, forwarded to every point (but for the keys the study sets per point)."""
    controls: bool = True
    """Run a single-process control point for every per-rank batch no world-size-1 point covers."""
    launcher: str = "torchrun"
    """torchrun (this machine) | srun (every point a step of the Slurm allocation)."""
    procs_per_node: int = 1
    """srun: processes per node; a point of world size N runs on N / procs_per_node nodes."""

    @property
    def dir(self) -> Path:
        return self.root / self.name

    def control_batches(self) -> tuple[int, ...]:
        """Per-rank batches of multi-process points that no world-size-1 point of the study runs."""
        if not self.controls:
            return ()
        covered = {self.batch_per_rank(1)} if 1 in self.nprocs else set()
        return tuple(sorted({self.batch_per_rank(n) for n in self.nprocs if n > 1} - covered))

    def points(self) -> list[Point]:
        # Repeat-major order: the first pass gives a whole curve early, and slow drift of
        # the machine (other load, heat) spreads over all world sizes instead of biasing one.
        # A repeat's controls run right after its points, under the same conditions.
        return [p for r in range(self.repeats)
                for p in [*(Point(n, r) for n in self.nprocs), *(Point(1, r, b) for b in self.control_batches())]]

    def batch_per_rank(self, world_size: int) -> int:
        if self.kind == "strong":
            assert self.global_batch_size is not None
            return self.global_batch_size // world_size
        assert self.batch_size_per_rank is not None
        return self.batch_size_per_rank

    def definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "exp": self.exp,
            "nprocs": list(self.nprocs),
            "repeats": self.repeats,
            "fail_fast": self.fail_fast,
            "threads_per_process": self.threads_per_process,
            "global_batch_size": self.global_batch_size,
            "batch_size_per_rank": {str(n): self.batch_per_rank(n) for n in self.nprocs},
            "launcher": ("torchrun --standalone" if self.launcher == "torchrun" else
                         f"srun (Slurm job {slurm.job_id()} on {os.environ.get('SLURM_JOB_NODELIST')})"),
            **({"nodes": [n // self.procs_per_node for n in self.nprocs], "procs_per_node": self.procs_per_node}
               if self.launcher == "srun" else {}),
            "controls": self.controls,
            "control_batches": list(self.control_batches()),
            "overrides": list(self.user_overrides),
        }


@dataclass
class Outcome:
    """What happened to one point in this invocation."""

    run_id: str
    world_size: int
    repeat: int
    status: str
    """completed | failed | skipped (completed earlier) | pending (not reached)."""
    elapsed_s: float = 0.0
    error: str | None = None
    moved_aside: list[str] = field(default_factory=list)
    solo_batch: int | None = None
    """A control point's per-rank batch; None for a point of the study."""


def override_key(override: str) -> str:
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def _int_list(key: str, value: Any) -> tuple[int, ...]:
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not items:
        raise ConfigError(f"{key} is empty; give the world sizes to run, e.g. {key}=[1,2,4]")
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool) or item < 1:
            raise ConfigError(f"{key} must list positive integers, e.g. {key}=[1,2,4] (got {item!r} in {items})")
    return tuple(sorted(set(items)))


def _positive(key: str, value: Any) -> int:
    return config.int_at_least(key, value, 1)


def study_strategies(cfg: DictConfig) -> tuple[str, ...] | None:
    """``study.strategies``, checked: None (the points run ``dist.strategy``), or each of ddp|zero1|fsdp once."""
    study = cfg.get("study")
    value = study.get("strategies") if study is not None else None
    if value is None:
        return None
    valid = "|".join(config.STRATEGIES)
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not items:
        raise ConfigError(f"study.strategies is empty; list the strategies to compare, e.g. "
                          f"study.strategies=[ddp,fsdp] (each one of {valid}), or leave it null")
    for item in items:
        if item not in config.STRATEGIES:
            raise ConfigError(f"study.strategies has {item!r}; each entry must be one of {valid}, "
                              "e.g. study.strategies=[ddp,fsdp]")
    twice = next((item for item in items if items.count(item) > 1), None)
    if twice is not None:
        raise ConfigError(f"study.strategies lists {twice} twice; give each strategy once")
    return tuple(items)


def strategy_overrides(argv: Sequence[str], strategies: Sequence[str]) -> list[str]:
    """``study.strategies`` as ``dist.strategy``: one value (a study), or a comma list (a sweep, one study each)."""
    if any(override_key(o) == "dist.strategy" for o in argv):
        raise ConfigError("study.strategies and dist.strategy are both given; give the strategies once "
                          "(study.strategies=[ddp,fsdp] runs a study for each)")
    kept = [o for o in argv if override_key(o) != "study.strategies"]
    return [*kept, "study.strategies=null", f"dist.strategy={','.join(strategies)}"]


def strategies_sweep_dir(cfg: DictConfig, argv: Sequence[str]) -> list[str]:
    """Under Slurm, the sweep folder of ``study.strategies`` is named as the scripts name a SWEEP's (STUDY, or
    ``<kind>-sweep-j<job>``): a requeued job finds it again, and its resubmission (STUDY=that folder) too."""
    study = cfg.study
    if (any(override_key(o) == "hydra.sweep.dir" for o in argv) or not slurm.in_allocation()
            or study.get("launcher", "auto") == "torchrun"):
        return []
    named = any(override_key(o) == "study.name" for o in argv)
    name = str(study.name) if named else f"{study.get('kind')}-sweep-j{slurm.job_id()}"
    return [f"hydra.sweep.dir={Path(str(cfg.paths.root)).absolute() / name}"]


def spec_from_config(cfg: DictConfig, user_overrides: Sequence[str]) -> StudySpec:
    """Check the study input; every mistake is one ConfigError before anything runs."""
    study = cfg.get("study")
    if study is None:
        raise ConfigError("no study section; choose study=strong or study=weak")
    kind = study.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"study.kind must be one of {'|'.join(KINDS)} (got {kind!r}); choose study=strong or study=weak")
    for key in ("paths.run_id",):
        if any(override_key(o) == key for o in user_overrides):
            raise ConfigError(f"{key} is set by the study for every point (n<N>-r<repeat>); leave it out")
    name = str(study.get("name"))
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"study.name must be a plain directory name (got {name!r})")
    launcher = study.get("launcher", "auto")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"study.launcher must be one of {'|'.join(LAUNCHERS)} (got {launcher!r})")
    if launcher == "auto":
        launcher = "srun" if slurm.in_allocation() else "torchrun"
    procs_per_node = 1
    if launcher == "srun":
        if not slurm.in_allocation():
            raise ConfigError("study.launcher=srun needs a Slurm allocation (sbatch slurm/strong_scaling.sh); "
                              "use study.launcher=torchrun here")
        requested = study.get("procs_per_node", "auto")
        procs_per_node = slurm.gpus_per_node() if requested == "auto" else _positive("study.procs_per_node", requested)
        nodes = study.get("nodes")
        nodes = slurm.node_counts(None if nodes is None else _int_list("study.nodes", nodes))
        nprocs = tuple(sorted({n * procs_per_node for n in nodes}))
        # A study started without a name under Slurm is named after its job (scaling.study.slurm).
        if not any(override_key(o) == "study.name" for o in user_overrides):
            name = ""
    else:
        nprocs = _int_list("study.nprocs", study.get("nprocs"))
    repeats = _positive("study.repeats", study.get("repeats", 1))
    fail_fast = config.boolean("study.fail_fast", study.get("fail_fast", False))
    controls = config.boolean("study.controls", study.get("controls", True))
    # The same threads at every point: explicit, else the cores of a task under srun
    # (--cpus-per-task), else the cores here shared by the largest point.
    study_threads = study.get("threads", "auto")
    key, requested = ("study.threads", study_threads) if study_threads != "auto" else ("dist.threads", cfg.dist.threads)
    threads = (resolve_threads(key, requested, max(nprocs)) if launcher == "torchrun"
               else resolve_threads(key, requested, procs_per_node, {"SLURM_CPUS_PER_TASK": str(slurm.cpus_per_task())}))
    global_batch, per_rank = _batch_sizes(kind, cfg, nprocs)
    return StudySpec(
        name=name, kind=kind, exp=str(cfg.get("exp_name", "default")), nprocs=nprocs, repeats=repeats,
        fail_fast=fail_fast, threads_per_process=threads, global_batch_size=global_batch,
        batch_size_per_rank=per_rank, root=Path(str(cfg.paths.root)).absolute(),
        user_overrides=tuple(user_overrides), controls=controls, launcher=launcher, procs_per_node=procs_per_node,
    )


def _batch_sizes(kind: str, cfg: DictConfig, nprocs: Sequence[int]) -> tuple[int | None, int | None]:
    train = cfg.train
    if kind == "weak":
        if train.global_batch_size is not None:
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size} fixes the global batch, which is strong "
                "scaling; weak scaling keeps train.batch_size per rank (use study=strong, or leave it unset)")
        return None, _positive("train.batch_size", train.batch_size)
    # Strong scaling without an explicit global batch: the smallest point runs the experiment's per-rank
    # batch, rounded up so that every world size divides the global batch.
    global_batch = train.global_batch_size
    if global_batch is None:
        smallest = _positive("train.batch_size", train.batch_size) * min(nprocs)
        multiple = math.lcm(*nprocs)
        global_batch = -(-smallest // multiple) * multiple
    global_batch = _positive("train.global_batch_size", global_batch)
    bad = [n for n in nprocs if global_batch % n]
    if bad:
        multiple = math.lcm(*nprocs)
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by world size {bad[0]} of "
            f"study.nprocs={list(nprocs)}; choose a multiple of {multiple}")
    return global_batch, None


def job_overrides(spec: StudySpec, point: Point) -> list[str]:
    extra = [f"study.name={spec.name}", f"paths.root={spec.root}", f"paths.run_id={point.run_id}",
             f"dist.threads={spec.threads_per_process}"]
    if point.solo_batch is not None:
        extra += ["train.global_batch_size=null", f"train.batch_size={point.solo_batch}"]
    elif spec.kind == "strong":
        extra.append(f"train.global_batch_size={spec.global_batch_size}")
    owned = CONTROL_KEYS if point.is_control else POINT_KEYS
    forwarded = [o for o in spec.user_overrides if override_key(o) not in owned]
    return [*forwarded, *extra]


def check_points(spec: StudySpec) -> dict[str, Any]:
    """Compose the training config of the first point and check it as the training job would."""
    first = spec.points()[0]
    run_cfg = config.parse(cli.compose_config(job_overrides(spec, first)))
    for n in spec.nprocs:
        run_cfg.train.per_rank_batch(n)
    for control in (p for p in spec.points() if p.is_control and p.repeat == 0):
        config.parse(cli.compose_config(job_overrides(spec, control)))
    return run_cfg.raw


def study_settings(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten(raw).items()
            if not any(k == p or k.startswith(p) for p in RESUMABLE_KEYS) and k != "paths.run_id"}


def check_resumable(spec: StudySpec, settings: dict[str, Any]) -> None:
    """A study resumed under its name must have the same settings, or its points would mix."""
    previous = previous_json(spec.dir / STUDY_JSON)
    if previous is None:
        return  # none, or unreadable: study.json is rewritten; the run folders decide what is done
    before = previous.get("settings") or {}
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if previous.get("kind") not in (None, spec.kind):
        changed.insert(0, "study.kind")
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed[:3])
        raise ConfigError(
            f"study {spec.name!r} in {spec.dir} was run with other settings ({shown}); "
            "use another study.name, or the same settings to resume it")
