"""``python -m scaling.study +exp=NAME study=strong|weak study.nprocs=[1,2,4] [overrides]``.

A scaling study: every point (world size N, repeat r) is a real training job,
``torchrun --standalone --nproc_per_node=N -m scaling.train`` on this machine or,
inside a Slurm allocation (``study.launcher``), ``srun --nodes=n ... python -m
scaling.train`` (scaling.study.slurm), whose records land in
``<paths.root>/<study.name>/n<N>-r<r>/``. Every point runs with the same
intra-op threads per process, so the points differ only in the number of
processes. The study resumes: a point whose run.json says ``completed`` is not
run again, and a failed or interrupted one is moved aside and rerun. It ends with
the report (``scaling.report``) over the study folder.

With ``study.controls=true`` (the default) each repeat also runs, for every
per-rank batch B of a multi-process point, one single-process control point
``solo-b<B>-r<r>``: plain ``python -m scaling.train`` (no launcher, no peer) at
per-rank batch B. A world-size-1 point of the study at batch B already is that
control, so none is run for B then. The report splits the lost efficiency with
it (scaling.report.waterfall).

``study.strategies=[ddp,fsdp]`` compares data-parallel strategies: with one entry it is
``dist.strategy``; with several the study runs as the sweep ``-m dist.strategy=ddp,fsdp``
(scaling.sweep: one study per strategy in one sweep folder, the same resume, and one
comparison report in ``<sweep>/compare/``).

A signal stops the study cleanly: Ctrl-C (SIGINT), SIGTERM, or Slurm's early-stop
SIGUSR1 is passed once to the running job, which records it, and the study exits
(130, or ``EXIT_STOPPED`` for SIGUSR1 and for any stop under srun).
"""

from __future__ import annotations

import fcntl
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
from omegaconf import DictConfig, ListConfig

from scaling import cli, config
from scaling.config import ConfigError
from scaling.launch.lifetime import end_with_parent
from scaling.launch.threads import available_cores, resolve_threads
from scaling.records.files import flatten, mark_failed, previous_json, read_json, write_json
from scaling.study import slurm

KINDS = ("strong", "weak")
LAUNCHERS = ("auto", "torchrun", "srun")
EXIT_STOPPED = 3
"""Stopped early by the scheduler (time limit, preemption): run again, or let the job requeue, to continue."""
STUDY_JSON = "study.json"
# Keys the study sets for every point; the user's values for them are replaced.
POINT_KEYS = ("study.name", "paths.root", "paths.run_id", "dist.threads", "train.global_batch_size")
# A control point sets the per-rank batch itself as well.
CONTROL_KEYS = (*POINT_KEYS, "train.batch_size")
# Keys that may change when a study is resumed (extending it is fine); any other difference is refused.
RESUMABLE_KEYS = ("study.nprocs", "study.nodes", "study.repeats", "study.fail_fast", "study.controls", "paths.", "logger.")
STOP_GRACE_S = 30.0


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


class StudyInterrupted(Exception):
    """A termination signal (scheduler time limit, preemption) reached the study."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- input ------------------------------------------------------------------------------------


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


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    return value


def _positive(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1 (got {value!r})")
    return value


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
    fail_fast = _boolean("study.fail_fast", study.get("fail_fast", False))
    controls = _boolean("study.controls", study.get("controls", True))
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


def job_command(spec: StudySpec, point: Point) -> list[str]:
    """torchrun, as ``python -m torch.distributed.run`` so that it is the Python running the study;
    a control point is what a single-process user runs: ``python -m scaling.train``, no launcher.
    Under srun, a step over the point's nodes (a control point: one task on one node)."""
    if spec.launcher == "srun":
        nodes, per_node = (1, 1) if point.is_control else (point.world_size // spec.procs_per_node, spec.procs_per_node)
        return slurm.point_command(sys.executable, nodes, per_node, job_overrides(spec, point))
    if point.is_control:
        return [sys.executable, "-m", "scaling.train", *job_overrides(spec, point)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={point.world_size}",
            "-m", "scaling.train", *job_overrides(spec, point)]


def job_env(spec: StudySpec, index: int) -> dict[str, str]:
    """``index``: the point's place in the study (under srun, its rendezvous port)."""
    env = dict(os.environ)
    if spec.launcher == "srun":
        env.update(slurm.point_env(index))
    env["OMP_NUM_THREADS"] = str(spec.threads_per_process)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_points(spec: StudySpec) -> dict[str, Any]:
    """Compose the training config of the first point and check it as the training job would."""
    first = spec.points()[0]
    run_cfg = config.parse(cli.compose_config(job_overrides(spec, first)))
    for n in spec.nprocs:
        run_cfg.train.per_rank_batch(n)
    for control in (p for p in spec.points() if p.is_control and p.repeat == 0):
        config.parse(cli.compose_config(job_overrides(spec, control)))
    return run_cfg.raw


def comparable(raw: dict[str, Any]) -> dict[str, Any]:
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


# -- points -----------------------------------------------------------------------------------


def point_state(run_dir: Path) -> str:
    """completed | absent | incomplete (failed, interrupted, or unreadable records)."""
    if not run_dir.exists():
        return "absent"
    try:
        status = read_json(run_dir / "run.json").get("status")
    except ValueError:
        return "incomplete"
    return "completed" if status == "completed" else "incomplete"


def move_aside(spec: StudySpec, point: Point, stamp: str) -> list[str]:
    """Rename a failed or partial point's folder (and its launcher log) so the point can run again."""
    moved = []
    for path in (spec.dir / point.run_id, launch_log(spec, point)):
        if path.exists():
            target = path.with_name(f"{point.run_id}.failed-{stamp}{path.suffix if path.is_file() else ''}")
            path.rename(target)
            moved.append(target.name)
    return moved


def launch_log(spec: StudySpec, point: Point) -> Path:
    return spec.dir / "logs" / f"{point.run_id}.log"


def failure_reason(spec: StudySpec, point: Point, returncode: int) -> str:
    """The cause as the records name it, else the job's last error line."""
    try:
        error = read_json(spec.dir / point.run_id / "run.json").get("error")
        if error:
            return str(error)
    except ValueError:
        pass
    try:
        lines = [ln.strip() for ln in launch_log(spec, point).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if "error" in line.lower() and not line.startswith(("[", "W", "I")):
            return line[:300]
    return f"{'the job' if point.is_control else 'torchrun'} exited with status {returncode}"


def stop_job(proc: subprocess.Popen, signum: int, run_dir: Path, srun: bool = False) -> None:
    """End the job the way its user would have, so that it records why it stopped.

    ``signum`` (SIGINT for Ctrl-C, SIGTERM for a scheduler's stop) goes once to the
    job's own process: torchrun passes it on to every rank (each rank runs in a
    session of its own), and each rank writes run.json ``failed`` with the cause.
    It is sent once only: a second signal on a rank that is already writing its
    failure would cut the record short. What is left after STOP_GRACE_S (torchrun,
    ranks, their children) is killed. A job stopped before it could write its
    record (during set-up) is marked failed here, with the cause. Under srun the
    early-stop SIGUSR1 goes to the job's steps through Slurm (``scancel --signal``),
    since the ranks may run on other nodes.
    """
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        family = _descendants(proc.pid)
        if not (srun and signum == signal.SIGUSR1 and slurm.signal_steps(signum)):
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        family += [p for p in _descendants(proc.pid) if p not in family]
        alive = wait_ended(family, deadline)
        if proc.poll() is None or alive:
            _kill(proc, alive)
        mark_stopped(run_dir, signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_ended(processes: Sequence[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until every one of ``processes`` has ended or ``deadline`` (monotonic) has passed; the ones still
    running. A process that has exited but is not reaped yet (a zombie: an orphan adopted by a subreaper that
    reaps late, such as a test runner or a container's init) has ended."""
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        psutil.wait_procs(alive, timeout=min(0.2, max(0.0, deadline - time.monotonic())))


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill(proc: subprocess.Popen, processes: Sequence[psutil.Process]) -> None:
    for target in (*processes, *_descendants(proc.pid)):
        try:
            target.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        pass


def stop_cause(signum: int) -> str:
    if signum == signal.SIGINT:
        return "interrupted (Ctrl-C / SIGINT to the study)"
    if signum == signal.SIGUSR1:
        return "stopped by SIGUSR1 from Slurm (time limit or preemption ahead)"
    return f"interrupted ({signal.Signals(signum).name} to the study)"


def mark_stopped(run_dir: Path, signum: int) -> None:
    """run.json still says running after the job is gone: it was stopped before it could say so itself."""
    mark_failed(run_dir / "run.json", f"{stop_cause(signum)}, before the job recorded it", only_if_running=True)


def run_point(spec: StudySpec, point: Point, index: int = 0) -> Outcome:
    log_path = launch_log(spec, point)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = job_command(spec, point)
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ OMP_NUM_THREADS={spec.threads_per_process} {shlex.join(cmd)}\n")
        log.flush()
        # A session of its own: Ctrl-C reaches the study alone, which then ends the whole job; and
        # the job is sent SIGTERM if the study dies without doing so (killed outright).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=job_env(spec, index), start_new_session=True, preexec_fn=end_with_parent())
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:
            stop_job(proc, signal.SIGINT, spec.dir / point.run_id)
            raise
        except StudyInterrupted as exc:
            stop_job(proc, exc.signum, spec.dir / point.run_id, srun=spec.launcher == "srun")
            raise
        except BaseException:
            stop_job(proc, signal.SIGTERM, spec.dir / point.run_id)
            raise
    elapsed_s = time.monotonic() - started
    if returncode == 0 and point_state(spec.dir / point.run_id) == "completed":
        return Outcome(point.run_id, point.world_size, point.repeat, "completed", elapsed_s,
                       solo_batch=point.solo_batch)
    return Outcome(point.run_id, point.world_size, point.repeat, "failed", elapsed_s,
                   error=failure_reason(spec, point, returncode), solo_batch=point.solo_batch)


# -- progress ---------------------------------------------------------------------------------


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Progress:
    """Elapsed time and an estimate of what is left, from the points already run at each size."""

    total: int
    started: float = field(default_factory=time.monotonic)
    durations_s: dict[str, list[float]] = field(default_factory=dict)
    """Elapsed seconds of the points run, by Point.group."""

    def record(self, point: Point, elapsed_s: float) -> None:
        self.durations_s.setdefault(point.group, []).append(elapsed_s)

    def estimate_s(self, remaining: Sequence[Point]) -> float | None:
        every = [d for ds in self.durations_s.values() for d in ds]
        if not every:
            return None
        fallback = sum(every) / len(every)
        return sum(_mean(self.durations_s.get(p.group)) or fallback for p in remaining)

    def line(self, index: int, point: Point, repeats: int, remaining: Sequence[Point]) -> str:
        eta = self.estimate_s(remaining)
        return (f"[point {index}/{self.total}] {point.run_id}: {point.describe()}, "
                f"repeat {point.repeat + 1}/{repeats}  elapsed {fmt_duration(time.monotonic() - self.started)}  "
                f"eta {fmt_duration(eta) if eta is not None else '?'}")


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


# -- the study --------------------------------------------------------------------------------


@contextmanager
def study_lock(spec: StudySpec) -> Iterator[None]:
    """One study process per study folder; the lock goes with the process, however it ends."""
    spec.dir.mkdir(parents=True, exist_ok=True)
    with open(spec.dir / ".study.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"study {spec.name!r} in {spec.dir} is being run by another process; "
                              "wait for it or choose another study.name") from None
        yield


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (scheduler time limit, kill) and Slurm's early-stop SIGUSR1 stop the study like Ctrl-C does."""

    def interrupt(signum: int, frame: Any) -> None:
        say(f"received {signal.Signals(signum).name}: stopping the running point cleanly")
        raise StudyInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def say(text: str) -> None:
    """A line of the study's own, with the time: in a batch job's output it stands apart from the points'."""
    print(f"[scaling {time.strftime('%H:%M:%S')}] {text}", flush=True)


def write_study_json(spec: StudySpec, settings: dict[str, Any], outcomes: list[Outcome], status: str,
                     started_at: float) -> None:
    write_json(spec.dir / STUDY_JSON, {
        **spec.definition(),
        "status": status,
        "started_at": started_at,
        "updated_at": time.time(),
        "command": shlex.join([sys.executable, "-m", "scaling.study", *spec.user_overrides]),
        "points": [asdict(o) for o in outcomes],
        "settings": settings,
    })


def announce(spec: StudySpec) -> None:
    batches = ", ".join(f"{n}: {spec.batch_per_rank(n)}" for n in spec.nprocs)
    fixed = (f"global batch {spec.global_batch_size} fixed" if spec.kind == "strong"
             else f"per-rank batch {spec.batch_size_per_rank} fixed")
    print(f"study {spec.name}: {spec.kind} scaling of {spec.exp}, world sizes {list(spec.nprocs)}, "
          f"{spec.repeats} repeat(s), {fixed} (per-rank batch by world size: {batches})", flush=True)
    if spec.launcher == "srun":
        print(f"  every point: srun, {spec.procs_per_node} process(es) per node on world size / "
              f"{spec.procs_per_node} node(s) of Slurm job {slurm.job_id()}, {spec.threads_per_process} thread(s) "
              "per process (--cpus-per-task, OMP_NUM_THREADS and dist.threads)", flush=True)
    else:
        print(f"  every point: torchrun --standalone, {spec.threads_per_process} thread(s) per process "
              f"(OMP_NUM_THREADS and dist.threads); {available_cores()} core(s) here", flush=True)
    crowded = [n for n in spec.nprocs if n * spec.threads_per_process > available_cores()]
    if crowded and spec.launcher == "torchrun":
        print(f"  note: from {crowded[0]} processes on, processes x threads exceed the {available_cores()} cores here; "
              "those points measure contention for cores as well as scaling", flush=True)
    print(f"  {controls_line(spec)}", flush=True)
    print(f"  records: {spec.dir}", flush=True)


def controls_line(spec: StudySpec) -> str:
    if not spec.controls:
        return ("controls: none (study.controls=false); the report cannot split the lost efficiency into "
                "smaller batch, contention and interference")
    batches = spec.control_batches()
    covered = (f"; per-rank batch {spec.batch_per_rank(1)} is run by the 1-process point itself"
               if 1 in spec.nprocs and len(spec.nprocs) > 1 else "")
    if not batches:
        return f"controls: no solo control point needed{covered}"
    names = ", ".join(f"solo-b{b}" for b in batches)
    return (f"controls: {names} per repeat (python -m scaling.train, 1 process, no peer, at the per-rank batch "
            f"of the multi-process points){covered}")


def execute(spec: StudySpec, settings: dict[str, Any], completed: list[str] | None = None) -> list[Outcome]:
    """Run every point not completed before (``completed`` gets the run ids of those that complete now);
    raises StudyInterrupted after stopping a running job."""
    points = spec.points()
    outcomes = [Outcome(p.run_id, p.world_size, p.repeat, "pending", solo_batch=p.solo_batch) for p in points]
    started_at = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    progress = Progress(total=len(points))
    write_study_json(spec, settings, outcomes, "running", started_at)
    status = "interrupted"
    try:
        for index, (point, outcome) in enumerate(zip(points, outcomes), start=1):
            state = point_state(spec.dir / point.run_id)
            if state == "completed":
                outcome.status = "skipped"
                print(f"[point {index}/{len(points)}] {point.run_id}: completed earlier, skipped", flush=True)
                continue
            if state == "incomplete":
                outcome.moved_aside = move_aside(spec, point, stamp)
                print(f"[point {index}/{len(points)}] {point.run_id}: earlier attempt failed or was cut short; "
                      f"moved aside to {', '.join(outcome.moved_aside)}; running again", flush=True)
            remaining = [p for p, o in zip(points[index:], outcomes[index:])
                         if point_state(spec.dir / p.run_id) != "completed"]
            print(progress.line(index, point, spec.repeats, [point, *remaining]), flush=True)
            result = run_point(spec, point, index - 1)
            outcome.status, outcome.elapsed_s, outcome.error = result.status, result.elapsed_s, result.error
            progress.record(point, result.elapsed_s)
            if result.status == "completed" and completed is not None:
                completed.append(point.run_id)
            print(f"    {point.run_id} {result_line(spec, point, result)}", flush=True)
            write_study_json(spec, settings, outcomes, "running", started_at)
            if result.status == "failed" and spec.fail_fast:
                print("    study.fail_fast=true: stopping at the first failed point", flush=True)
                break
        status = "failed" if any(o.status == "failed" for o in outcomes) else "completed"
        return outcomes
    finally:
        write_study_json(spec, settings, outcomes, status, started_at)


def result_line(spec: StudySpec, point: Point, outcome: Outcome) -> str:
    took = f"in {fmt_duration(outcome.elapsed_s)}"
    if outcome.status != "completed":
        return f"FAILED {took}: {outcome.error}  (log: {launch_log(spec, point)})"
    try:
        summary = read_json(spec.dir / point.run_id / "run.json").get("summary") or {}
    except ValueError:
        summary = {}
    step_s, rate, bound = summary.get("step_s"), summary.get("samples_per_s"), summary.get("bound")
    if step_s is None:
        return f"completed {took}"
    return f"completed {took}: median step {step_s:.4f} s, {rate:.1f} samples/s, {bound}-bound"


def report(spec: StudySpec) -> None:
    from scaling.report import build_report, console_text

    result = build_report([spec.dir], spec.dir)
    print("\n" + console_text(result), flush=True)


def stopped(spec: StudySpec, signum: int, completed: Sequence[str], sweep: Path | None = None) -> int:
    """After a scheduler's stop: requeue the job (Slurm, --requeue, progress made), or say how to continue.

    Inside a sweep (``sweep``: its folder) the job continues, or is submitted again, as the whole sweep.
    """
    name = signal.Signals(signum).name
    if spec.launcher == "srun":
        what, folder = (f"sweep {sweep.name}", sweep) if sweep else (f"study {spec.name}", spec.dir)
        # A stop before any point completed means the point does not fit in the time
        # limit: running it again would only repeat that.
        if signum == signal.SIGUSR1 and completed and slurm.requeue(what, say):
            return EXIT_STOPPED
        say(f"{what} is incomplete (stopped by {name}); to continue it, submit again with the same settings:")
        say(slurm.resubmit_command(folder.name, folder.parent))
    else:
        print(f"\nstudy {spec.name} stopped ({name}): the running job was stopped. "
              "Run the same command again to continue; completed points are kept.", file=sys.stderr, flush=True)
    return EXIT_STOPPED


def main(cfg: DictConfig, argv: Sequence[str], sweep: Path | None = None,
         multirun: Callable[[Sequence[str]], int] | None = None) -> int:
    """One study; ``sweep``: the folder of the sweep it belongs to (what a stopped job continues).

    ``study.strategies`` with one entry runs this study under that ``dist.strategy``; with several, the
    sweep over ``dist.strategy`` (``multirun``, the command's ``-m``)."""
    strategies = study_strategies(cfg)
    if strategies is not None:
        argv = strategy_overrides(argv, strategies)
        if len(strategies) > 1:
            if multirun is None:
                raise ConfigError("study.strategies with several strategies runs as a sweep over dist.strategy; "
                                  "start it with python -m scaling.study")
            argv = [*argv, *strategies_sweep_dir(cfg, argv)]
            say(f"study.strategies=[{','.join(strategies)}]: one study per strategy, run as the sweep "
                f"python -m scaling.study -m {shlex.join(argv)}")
            return int(multirun(argv) or 0)
        cfg = cli.compose_config(argv)
    spec = spec_from_config(cfg, argv)
    if not spec.name:
        spec = replace(spec, name=slurm.claim_study_name(spec.kind, spec.root, say))
    settings = comparable(check_points(spec))
    completed: list[str] = []
    with study_lock(spec):
        check_resumable(spec, settings)
        announce(spec)
        try:
            with terminate_as_interrupt():
                outcomes = execute(spec, settings, completed)
        except StudyInterrupted as exc:
            if spec.launcher == "srun" or exc.signum == signal.SIGUSR1:
                return stopped(spec, exc.signum, completed, sweep)
            print(f"\nstudy {spec.name} interrupted ({exc}): the running job was stopped. "
                  "Run the same command again to continue; completed points are kept.", file=sys.stderr, flush=True)
            return 130
        except KeyboardInterrupt as exc:
            reason = f" ({exc})" if str(exc) else ""
            print(f"\nstudy {spec.name} interrupted{reason}: the running job was stopped. "
                  "Run the same command again to continue; completed points are kept.", file=sys.stderr, flush=True)
            return 130
    report(spec)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        names = ", ".join(f"{o.run_id} ({o.error})" for o in failed)
        print(f"\nstudy {spec.name}: {len(failed)} point(s) failed: {names}", file=sys.stderr, flush=True)
        return 1
    return 0


def entry(argv: Sequence[str] | None = None, multirun: Callable[[Sequence[str]], int] | None = None) -> int:
    """The command; ``multirun`` runs a ``-m`` sweep (the sweep module sits above the study, so the
    command's ``__main__`` hands it in)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, _ = cli.split_flags(args)
    except ConfigError:
        overrides = []  # cli.run reports the flag
    return cli.run("scaling.study", lambda cfg: main(cfg, overrides, multirun=multirun), argv=args, multirun=multirun)

