"""The records of an inference run as it goes: each replica's finished batch sizes, and ``infer.json`` at every end.

    <run folder>/
      infer.json                    "running" from the start; "completed", or "failed" with what finished
      logs/rank<R>.batches.jsonl    replica R's batch sizes, one line each as it finishes them
      logs/rank<R>.error.json       a replica's error (scaling.train.failure's format)

Rank 0 writes ``infer.json``. When the job fails (an exception, SIGTERM or
SIGUSR1 turned into one), every replica records its error; rank 0 names the
cause (waiting briefly, as training does, for the replica whose own code
failed) and writes ``status: failed``, ``error``, ``failed_at`` and the batch
sizes every replica finished, pooled as in a completed run. A rank 0 killed
outright (SIGKILL, the OOM killer) leaves ``status: running``. Plain Python.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.infer import findings
from scaling.infer.schema import INFER_JSON, latency_summary
from scaling.records.files import write_json
from scaling.train import failure


PER_REPLICA_ONLY = ("latency_samples_s", "server_service_s", "server_issue_lag_s")


def pooled(replicas: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The node's view: samples pooled, throughput summed, memory summed, bounds of replica 0.

    Each replica's samples (``latency_samples_s``, ``server_service_s``,
    ``server_issue_lag_s``) stay in ``per_replica``; the node's batches carry
    the summaries only.
    """
    out = []
    for same in zip(*replicas):
        first = same[0]
        point = {k: v for k, v in first.items() if k not in PER_REPLICA_ONLY}
        if len(same) > 1:
            point["memory"] = {k: sum(p["memory"][k] for p in same) for k in first["memory"]}
            point["samples_per_s"] = sum(p["samples_per_s"] for p in same)
            if first["latency_s"] is not None:
                samples = [s for p in same for s in p["latency_samples_s"]]
                point.update(queries=len(samples), latency_s=latency_summary(samples),
                             single_stream_samples_per_s=sum(p["single_stream_samples_per_s"] for p in same))
            if first["offline"] is not None:
                offline = [p["offline"] for p in same]
                point["offline"] = {"queries": sum(o["queries"] for o in offline), "batch_size": first["batch_size"],
                                    "total_s": max(o["total_s"] for o in offline),
                                    "samples_per_s": sum(o["samples_per_s"] for o in offline)}
        out.append(point)
    return out


@dataclass(frozen=True)
class RankFiles:
    """One replica's files in the run folder."""

    dir: Path
    rank: int

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    def batches_path(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.batches.jsonl"

    def start(self) -> None:
        self.logs.mkdir(exist_ok=True)
        self.batches_path(self.rank).write_text("")

    def append_batch(self, point: dict[str, Any]) -> None:
        with open(self.batches_path(self.rank), "a") as f:
            f.write(json.dumps(point) + "\n")

    def read_batches(self, rank: int) -> list[dict[str, Any]]:
        """A replica's finished batch sizes; a torn last line (killed mid-write) is skipped."""
        out = []
        try:
            lines = self.batches_path(rank).read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def rank_errors(self, world_size: int) -> dict[int, dict[str, Any]]:
        errors = {}
        for rank in range(world_size):
            try:
                errors[rank] = json.loads((self.logs / f"rank{rank}.error.json").read_text())
            except (OSError, ValueError):
                pass
        return errors


def finished(files: RankFiles, world_size: int) -> list[list[dict[str, Any]]]:
    """Per replica, the batch sizes that every replica finished, in the order they ran."""
    per_rank = [files.read_batches(rank) for rank in range(world_size)]
    common = set.intersection(*({p["batch_size"] for p in batches} for batches in per_rank))
    return [[p for p in batches if p["batch_size"] in common] for batches in per_rank]


def write_failed(files: RankFiles, exc: BaseException, world_size: int, header: dict[str, Any]) -> str | None:
    """Record this replica's error; on rank 0, write ``infer.json`` as failed with what finished. Returns the cause."""
    own = failure.record_rank_error(files, exc)  # type: ignore[arg-type]  # its ``logs`` and ``rank``
    if files.rank != 0:
        return None
    if not own["root_cause"] and world_size > 1:
        deadline = time.monotonic() + failure.WAIT_FOR_ROOT_CAUSE_S
        while time.monotonic() < deadline and not any(e["root_cause"] for e in files.rank_errors(world_size).values()):
            time.sleep(0.05)
    cause = failure.failure_cause(own, files.rank_errors(world_size), world_size)
    gathered = finished(files, world_size)
    record = {**header, "status": "failed", "error": cause, "failed_at": time.time(),
              "finished_batch_sizes": [p["batch_size"] for p in gathered[0]], "batches": pooled(gathered),
              "per_replica": [{"rank": r, "batches": b} for r, b in enumerate(gathered)]}
    record["findings"] = findings.findings(record) if record["batches"] else []
    write_json(files.dir / INFER_JSON, record)
    return cause


def write_running(files: RankFiles, header: dict[str, Any]) -> None:
    write_json(files.dir / INFER_JSON, {**header, "status": "running", "started_at": time.time()})
