"""What happens when a rank fails.

Every rank that sees an exception writes ``logs/rank<R>.error.json``. One rank
writes the failed ``run.json``: the first to claim ``logs/.finalized`` (an
exclusive create, safe across processes and hosts sharing the folder). A rank
whose own code raised claims at once; a rank that only saw the consequence
(a broken connection, a timeout, the launcher's SIGTERM) waits briefly so that
the root cause can be named, then names the ranks that never reported (killed).
The finalizer rebuilds ``steps.jsonl`` from the per-rank step files, so every
step measured on all ranks is kept.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from scaling.errors import describe
from scaling.records import aggregate
from scaling.records.files import RunFiles, atomic_write_text, read_json, read_rank_steps, read_steps, write_run

WAIT_FOR_ROOT_CAUSE_S = 2.0


class RecordedFailure(Exception):
    """The job failed and its records say so; the traceback is in ``error_file``."""

    def __init__(self, error_file: Path) -> None:
        super().__init__(str(error_file))
        self.error_file = error_file


def recorded(prog: str, cause: str | None, log: logging.Logger, run_dir: Path, logs: Path,
             rank: int) -> RecordedFailure:
    """What a job raises once its records say it failed: the cause said (on the rank that found it) in the
    log and on stderr, and the rank's traceback file named."""
    if cause:
        log.error(f"run failed: {cause}")
        print(f"{prog}: run failed: {cause} (records in {run_dir})", file=sys.stderr)
    return RecordedFailure(logs / f"rank{rank}.error.json")


def exit_status(prog: str, body: Callable[[], object]) -> int:
    """Run a job's ``body`` and turn how it ended into the command's exit status.

    0 done; 1 failed (the traceback's file named where this rank holds the root
    cause); 130 interrupted; 143 terminated by a signal.
    """
    try:
        body()
    except RecordedFailure as exc:
        cause = exc.__cause__
        if isinstance(cause, KeyboardInterrupt):
            return 130
        if isinstance(cause, Terminated):
            return 143
        if is_root_cause(cause):
            print(f"{prog}: traceback in {exc.error_file}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143
    return 0


class Terminated(BaseException):
    """A signal asked this rank to stop (launcher teardown, scheduler time limit, preemption)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        reason = {
            "SIGTERM": "the launcher or scheduler ended the job",
            "SIGUSR1": "the scheduler's early-stop signal (time limit or preemption ahead)",
        }.get(name, "")
        super().__init__(f"stopped by {name}" + (f": {reason}" if reason else ""))


class SignalGuard:
    """Turns SIGTERM/SIGUSR1 into ``Terminated`` until failure handling begins."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.handling = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._raise)
        return self

    def _raise(self, signum: int, frame: Any) -> None:
        if not self.handling:
            raise Terminated(signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


COMM_ERROR_MARKERS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout",
                      "gloo", "nccl", "socket", "peer", "abort")


def is_root_cause(exc: BaseException) -> bool:
    """False for errors that are the consequence of another rank's failure."""
    if isinstance(exc, (Terminated, KeyboardInterrupt)):
        return False
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return False
    text = str(exc).lower()
    return not (isinstance(exc, RuntimeError) and any(marker in text for marker in COMM_ERROR_MARKERS))


def record_rank_error(files: RunFiles, exc: BaseException) -> dict[str, Any]:
    entry = {
        "rank": files.rank,
        "root_cause": is_root_cause(exc),
        "error": describe(exc),
        "time": time.time(),
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
    }
    atomic_write_text(files.logs / f"rank{files.rank}.error.json", json.dumps(entry, indent=2))
    return entry


def _claim(files: RunFiles) -> bool:
    try:
        fd = os.open(files.logs / ".finalized", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(files.rank).encode())
    os.close(fd)
    return True


def _rank_errors(files: RunFiles, world_size: int) -> dict[int, dict[str, Any]]:
    errors = {}
    for rank in range(world_size):
        path = files.logs / f"rank{rank}.error.json"
        try:
            errors[rank] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    return errors


def failure_cause(own: dict[str, Any], errors: dict[int, dict[str, Any]], world_size: int) -> str:
    roots = sorted((e for e in errors.values() if e["root_cause"]), key=lambda e: e["time"])
    if roots:
        return f"rank {roots[0]['rank']} failed: {roots[0]['error']}"
    silent = [rank for rank in range(world_size) if rank not in errors]
    if silent:
        names = ", ".join(map(str, silent))
        return (f"rank {names} stopped without reporting an error (killed, crashed or hung; "
                f"or not yet failed {WAIT_FOR_ROOT_CAUSE_S:.0f} s later); rank {own['rank']} saw: {own['error']}")
    return f"rank {own['rank']}: {own['error']}"


def rebuild_steps(files: RunFiles, world_size: int, global_batch: int, keys: tuple[str, ...],
                  nulls: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], dict[str, list[float]] | None]:
    """steps.jsonl from the per-rank files: every step that every rank recorded, and each rank's totals."""
    per_rank = [read_rank_steps(files.rank_steps_path(rank)) for rank in range(world_size)]
    common = sorted(set.intersection(*(set(steps) for steps in per_rank))) if per_rank else []
    if not common:  # nothing to rebuild from: keep whatever rank 0 gathered
        return read_steps(files.steps_jsonl), None
    values = np.array([[[steps[s].get(k, 0.0) for k in keys] for s in common] for steps in per_rank])
    records, totals = aggregate.reduce_steps(values, keys, common, global_batch, nulls)
    atomic_write_text(files.steps_jsonl, "".join(json.dumps(r) + "\n" for r in records))
    return records, totals


def finalize_failed(files: RunFiles, exc: BaseException, world_size: int, global_batch: int,
                    keys: tuple[str, ...], nulls: tuple[str, ...] = ()) -> str | None:
    """Record this rank's error; if this rank is the finalizer, mark run.json failed. Returns the cause.

    Every failing rank rebuilds steps.jsonl, under a lock: a rank that was a
    step behind may still record that step after the finalizer wrote, and the
    last rebuild then holds every step that all ranks finished.
    """
    own = record_rank_error(files, exc)
    if not own["root_cause"] and world_size > 1:
        deadline = time.monotonic() + WAIT_FOR_ROOT_CAUSE_S
        while time.monotonic() < deadline:
            if (files.logs / ".finalized").exists():
                break
            if any(e["root_cause"] for e in _rank_errors(files, world_size).values()):
                break
            time.sleep(0.05)
    cause = None
    if _claim(files):
        cause = failure_cause(own, _rank_errors(files, world_size), world_size)
    with _locked(files.logs / ".records.lock"):
        records, totals = rebuild_steps(files, world_size, global_batch, keys, nulls)
        try:
            run = read_json(files.run_json)
        except ValueError:
            run = {"world_size": world_size}
        if cause is not None:
            run.update(status="failed", error=cause, failed_at=time.time())
        elif run.get("status") != "failed":  # the finalizer has not written yet: never leave "running"
            run.update(status="failed", error=f"rank {own['rank']}: {own['error']}", failed_at=time.time())
        run["measured_steps_kept"] = len(records)
        if records:
            run["summary"] = {**aggregate.summarize(records, keys, nulls, totals), "partial": True}
        write_run(files.run_json, run)
    return cause


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
