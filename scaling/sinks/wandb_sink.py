"""Rank 0's wandb run: the job's config, its step records and its final summary.

What the run holds (the names are those of the records on disk):

- name ``<exp>-<study kind>-n<world size>-r<repeat>`` when the run folder is named
  ``n<N>-r<R>`` (as a study names it), else the run id (``mlp-n2-20250101-120000-ab12``);
  group = ``study.name``; job_type = ``study.kind``; tags = ``logger.wandb.tags``.
- config: the resolved config (as in config.yaml), plus ``run`` (run.json's
  description: world size, nodes, backend, launcher, device, batch sizes, …)
  and ``provenance`` (hosts, software versions, git commit, NCCL/GLOO/OMP variables).
- history: every key of each steps.jsonl record (``step_s``, ``comm_exposed_s``,
  ``samples_per_s``, ``<key>_max``/``<key>_min``, ``slowest_rank``, …) against
  ``step``, the measured step index, defined as wandb's step metric.
- summary: run.json's ``summary`` keys at the top level (so ``step_s`` in the
  summary is the median over measured steps, not wandb's default of the last
  value), plus ``memory`` and ``flops`` as in run.json, and ``status``.

The offline files go to ``<run folder>/wandb/`` unless ``WANDB_DIR`` is set.

wandb must never cost a training job more than a bounded wait: its start-up
runs in a worker thread and is abandoned after at most 0.4 x ``dist.timeout_s``
(the other ranks are meanwhile waiting in their first collective), and every
later call goes through the same thread. At a log interval rank 0 waits for the
worker to hand the records to wandb (about 1 ms per record), so that this work
is timed as the ``other_s`` of the step that logs, where the instrument's own
bookkeeping belongs, instead of slowing later phases from a background thread;
after ``LOG_TIMEOUT_S`` without an answer it stops logging. Any failure is
reported once; the records on disk are complete either way.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from scaling.config import RunConfig
from scaling.errors import describe

START_TIMEOUT_CAP_S = 20.0
"""Longest wait for wandb to start; WANDB_INIT_TIMEOUT may lower or raise it."""
START_SHARE_OF_DIST_TIMEOUT = 0.4
"""Never wait longer than this share of dist.timeout_s: the other ranks sit in a collective meanwhile."""
LOG_TIMEOUT_S = 5.0
"""Longest wait for wandb to take one log interval's records (a hung service): then logging stops."""
FINISH_TIMEOUT_S = 30.0
"""Longest wait at the end for wandb to write the last records and close the run."""

REPEAT_RUN_ID = re.compile(r"(?:^|-)n(\d+)-r(\d+)$")


def run_name(exp: str, kind: str, world_size: int, run_id: str) -> str:
    """``resnet-strong-n4-r0`` for a study's run folder ``n4-r0``; else the run id itself."""
    match = REPEAT_RUN_ID.search(run_id)
    if match:
        return f"{exp}-{kind}-n{world_size}-r{match.group(2)}"
    return run_id


def start_timeout_s(dist_timeout_s: float) -> float:
    """How long rank 0 may wait for wandb before the loop starts without it."""
    limit = START_TIMEOUT_CAP_S
    env = os.environ.get("WANDB_INIT_TIMEOUT")
    try:
        if env is not None and float(env) > 0:
            limit = float(env)
    except ValueError:
        pass  # wandb itself rejects the value at start-up, which is reported like any failure
    return max(1.0, min(limit, START_SHARE_OF_DIST_TIMEOUT * float(dist_timeout_s)))


def make(cfg: RunConfig, log: logging.Logger | None = None) -> "WandbSink | None":
    """The wandb sink (build it on rank 0 only), or None when ``logger.wandb.mode=disabled`` or wandb is missing."""
    log = log or logging.getLogger("scaling.rank0")
    if cfg.wandb.mode == "disabled":
        return None
    try:
        import wandb
    except Exception as exc:  # ImportError, or a broken install failing at import time
        log.warning(f"wandb: cannot import wandb ({exc}); logging to wandb is off for this run. "
                    "The records on disk are complete. Install it with `pip install wandb`, "
                    "or set logger.wandb.mode=disabled to silence this.")
        return None
    return WandbSink(cfg, wandb, log)


class WandbSink:
    """A Sink that mirrors the records into one wandb run, from a worker thread."""

    def __init__(self, cfg: RunConfig, wandb: ModuleType, log: logging.Logger) -> None:
        self.cfg = cfg
        self.wandb = wandb
        self.log = log
        self.start_timeout_s = start_timeout_s(cfg.dist.timeout_s)
        self.run_dir: Path | None = None
        self.wandb_run: Any = None
        self.offline_dir: Path | None = None
        self._queue: queue.Queue[tuple[str, Any, threading.Event | None]] = queue.Queue()
        self.log_timeout_s = min(LOG_TIMEOUT_S, 0.1 * float(cfg.dist.timeout_s))
        self._started = threading.Event()
        self._worker: threading.Thread | None = None
        self._active = False  # True while events are worth sending
        self._hung = False  # the worker stopped answering: never wait for it again
        self._warned = False
        self._lock = threading.Lock()

    # -- the Sink protocol (training thread; none of these blocks beyond its bound) -------------

    def on_start(self, run: dict[str, Any]) -> None:
        try:
            self.run_dir = Path(self.cfg.paths.root).absolute() / self.cfg.study_name / run["run_id"]
            init_kwargs = self._init_kwargs(run)
        except Exception as exc:
            self._warn("could not prepare the wandb run", exc)
            return
        self._worker = threading.Thread(target=self._work, args=(init_kwargs,), name="wandb-sink", daemon=True)
        self._active = True
        began = time.monotonic()
        self._worker.start()
        if not self._started.wait(self.start_timeout_s):
            self._hung = True
            self._warn(f"wandb did not start within {self.start_timeout_s:.0f} s (the limit is "
                       f"{START_SHARE_OF_DIST_TIMEOUT:g} x dist.timeout_s={self.cfg.dist.timeout_s:g} s, "
                       f"at most WANDB_INIT_TIMEOUT or {START_TIMEOUT_CAP_S:g} s)")
            return
        if self.wandb_run is not None:
            where = f" in {self.offline_dir}" if self.offline_dir else ""
            self.log.info(f"wandb: {self.cfg.wandb.mode} run {self.wandb_run.name!r}{where} "
                          f"(started in {time.monotonic() - began:.1f} s)")

    def on_steps(self, records: list[dict[str, Any]]) -> None:
        if not self._active:
            return
        taken = threading.Event()
        self._queue.put(("steps", [dict(r) for r in records], taken))
        if not taken.wait(self.log_timeout_s):
            self._hung = True
            self._warn(f"wandb did not take the step records within {self.log_timeout_s:g} s")

    def on_end(self, run: dict[str, Any]) -> None:
        """Write the summary and close the run (also after a logging failure, so that the file is whole)."""
        if self._hung or self._worker is None or self.wandb_run is None or not self._worker.is_alive():
            return
        self._queue.put(("end", run, None))
        self._worker.join(FINISH_TIMEOUT_S)
        if self._worker.is_alive():
            self._warn(f"wandb did not close the run within {FINISH_TIMEOUT_S:.0f} s")
        elif self._active and self.offline_dir is not None and self.cfg.wandb.mode == "offline":
            self.log.info(f"wandb: offline run saved; upload it with: wandb sync {self.offline_dir}")

    # -- the worker thread ----------------------------------------------------------------------

    def _init_kwargs(self, run: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        description = {k: v for k, v in run.items() if k not in ("status", "provenance", "started_at")}
        kwargs: dict[str, Any] = dict(
            mode=cfg.wandb.mode,
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=run_name(cfg.exp_name, cfg.study_kind, int(run["world_size"]), str(run["run_id"])),
            group=cfg.study_name,
            job_type=cfg.study_kind,
            tags=list(cfg.wandb.tags),
            config={**cfg.raw, "run": description, "provenance": run.get("provenance", {})},
            reinit="create_new",  # never finish a run the caller may have open in this process
            settings=self.wandb.Settings(
                init_timeout=self.start_timeout_s,
                console="off",  # the rank logs already hold the console output
                silent=True,  # one line of ours instead of wandb's banner
            ),
        )
        if "WANDB_DIR" not in os.environ:
            kwargs["dir"] = str(self.run_dir)
        return kwargs

    def _work(self, init_kwargs: dict[str, Any]) -> None:
        try:
            wandb_run = self.wandb.init(**init_kwargs)
            wandb_run.define_metric("step")
            wandb_run.define_metric("*", step_metric="step")
        except BaseException as exc:  # wandb raises its own errors, pydantic's, OSError, timeouts
            self._warn("wandb failed to start", exc)
            self._started.set()
            return
        with self._lock:
            abandoned = not self._active
            self.wandb_run = wandb_run
            self.offline_dir = _offline_dir(wandb_run)
        self._started.set()
        if abandoned:  # started after the training thread gave up on it: close it, log nothing
            self._finish(exit_code=1)
            return
        while True:
            kind, payload, taken = self._queue.get()
            if kind == "steps":
                self._guard("log the step records", lambda: _log_all(wandb_run, payload))
                taken.set()
            else:
                self._guard("write the run summary", lambda: wandb_run.summary.update(_summary(payload)))
                self._finish(exit_code=0 if payload.get("status") == "completed" else 1)
                return

    def _guard(self, what: str, action) -> None:
        if not self._active:
            return
        try:
            action()
        except Exception as exc:
            self._warn(f"wandb could not {what}", exc)

    def _finish(self, exit_code: int) -> None:
        try:
            self.wandb_run.finish(exit_code=exit_code)
        except Exception as exc:
            self._warn("wandb could not close the run", exc)

    def _warn(self, what: str, exc: BaseException | None = None) -> None:
        """The first failure is a warning; later ones are logged as information. wandb is then left alone."""
        with self._lock:
            first = not self._warned
            self._warned = True
            self._active = False
        cause = f" ({describe(exc, limit=300)})" if exc is not None else ""
        if first:
            where = f" in {self.run_dir}" if self.run_dir else ""
            self.log.warning(f"wandb: {what}{cause}; training goes on without wandb. "
                             f"The records on disk{where} are complete.")
        else:
            self.log.info(f"wandb: {what}{cause}")


def _log_all(wandb_run: Any, records: list[dict[str, Any]]) -> None:
    for record in records:
        wandb_run.log(record)


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    """run.json's summary at the top level (medians replace wandb's last values), memory and flops nested."""
    summary = dict(run.get("summary") or {})
    summary["memory"] = run.get("memory") or {}
    summary["flops"] = run.get("flops") or {}
    summary["status"] = run.get("status")
    if run.get("error"):
        summary["error"] = run["error"]
    return summary


def _offline_dir(wandb_run: Any) -> Path | None:
    """The folder `wandb sync` takes: the parent of the run's files folder."""
    try:
        return Path(wandb_run.dir).parent
    except Exception:
        return None
