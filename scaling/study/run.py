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
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from scaling import cli
from scaling.config import ConfigError
from scaling.launch.threads import available_cores
from scaling.records.files import read_json, write_json
from scaling.study import slurm
from scaling.study.points import Progress, StudyInterrupted, fmt_duration, launch_log, move_aside, point_state, run_point
from scaling.study.spec import (STUDY_JSON, Outcome, Point, StudySpec, check_points, check_resumable,
                                spec_from_config, strategies_sweep_dir, strategy_overrides, study_settings,
                                study_strategies)

EXIT_STOPPED = 3
"""Stopped early by the scheduler (time limit, preemption): run again, or let the job requeue, to continue."""


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


def run_study(cfg: DictConfig, argv: Sequence[str], sweep: Path | None = None,
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
    settings = study_settings(check_points(spec))
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
    return cli.run("scaling.study", lambda cfg: run_study(cfg, overrides, multirun=multirun), argv=args, multirun=multirun)
