"""Running one point of a study: its command and environment, its launcher log, its outcome, and stopping it.

A point is a job of its own (``torchrun --standalone``, plain ``python -m scaling.train`` for a control, or a
step of the Slurm allocation under ``srun``), in a session of its own, ended with the study if the study dies.
A signal to the study stops the running job the way its user would (``stop_job``), so that it records why.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from scaling.launch.lifetime import end_with_parent
from scaling.records.files import mark_failed, read_json
from scaling.study import slurm
from scaling.study.spec import Outcome, Point, StudySpec, job_overrides

STOP_GRACE_S = 30.0
"""What a stopped job has to end by itself before what is left of it is killed."""


class StudyInterrupted(Exception):
    """A termination signal (scheduler time limit, preemption) reached the study."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    return move_attempt_aside(spec.dir / point.run_id, launch_log(spec, point), stamp)


def move_attempt_aside(run_dir: Path, log: Path, stamp: str) -> list[str]:
    """``<name>`` and its log become ``<name>.failed-<stamp>`` (the log keeps its suffix): a study's point and a
    sweep's job are run again beside what their cut-short attempt left. The new names."""
    moved = []
    for path in (run_dir, log):
        if path.exists():
            target = path.with_name(f"{run_dir.name}.failed-{stamp}{path.suffix if path.is_file() else ''}")
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
