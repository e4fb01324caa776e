"""The records of a run: the one contract between training and reporting.

    <paths.root>/<study.name>/<run_id>/
      config.yaml          the resolved config
      run.json             provenance + summary, replaced atomically
      steps.jsonl          one object per measured step, aggregated over ranks
      buckets.json         per gradient bucket: bytes, ready time after backward start, all-reduce time
      timeline.json        the first measured steps of every rank as a Chrome trace (scaling.records.chrome_trace)
      logs/rank<R>.log     each rank's log
      logs/rank<R>.steps.jsonl   each rank's own step values, flushed every step

The per-rank step files are what lets a failed job keep every measured step:
whichever rank writes the failure rebuilds steps.jsonl from them.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import yaml

RUN_JSON = "run.json"
STEPS_JSONL = "steps.jsonl"
OPS_JSON = "ops.json"
BUCKETS_JSON = "buckets.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; ValueError (naming the file) when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def previous_json(path: Path) -> dict[str, Any] | None:
    """What an earlier run left in ``path``, or None where it left nothing readable (then it is rewritten)."""
    try:
        return read_json(path)
    except ValueError:
        return None


def write_run(path: Path, run: dict[str, Any]) -> None:
    """run.json, replaced atomically. Every writer of run.json goes through here."""
    write_json(path, run)


def mark_failed(path: Path, error: str, run: dict[str, Any] | None = None, only_if_running: bool = False,
                **fields: Any) -> dict[str, Any] | None:
    """Set run.json's status to failed with its cause (and ``fields``); returns what was written.

    ``run``: the content to start from when run.json cannot be read. With
    ``only_if_running``, a run.json that says anything but ``running`` (the job
    recorded its own end) is left as it is, and None is returned.
    """
    try:
        current = read_json(path)
    except ValueError:
        if run is None:
            return None
        current = dict(run)
    if only_if_running and current.get("status") != "running":
        return None
    current.update(status="failed", error=error, failed_at=time.time(), **fields)
    write_run(path, current)
    return current


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config (config.yaml) as dotted keys; an empty section stays a key of its own."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def new_run_id(prefix: str) -> str:
    """Unique per job: time to the second, plus randomness for jobs started together."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def create_run_dir(study_dir: Path, run_id: str | None, prefix: str) -> Path:
    """Make the run folder; never reuses one (mkdir is the atomic claim)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        path = study_dir / run_id
        try:
            path.mkdir()
        except FileExistsError:
            raise FileExistsError(f"run folder {path} exists already; no run overwrites another") from None
        return path
    for _ in range(100):
        path = study_dir / new_run_id(prefix)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free run id in {study_dir}")


class RunFiles:
    """Paths and writers of one run folder."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.dir = Path(run_dir)
        self.rank = rank
        self.logs = self.dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self._rank_steps = open(self.rank_steps_path(rank), "a", buffering=1)

    @property
    def run_json(self) -> Path:
        return self.dir / RUN_JSON

    @property
    def steps_jsonl(self) -> Path:
        return self.dir / STEPS_JSONL

    def rank_log_path(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def rank_steps_path(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.steps.jsonl"

    def write_config(self, raw: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(raw, sort_keys=False))

    def append_rank_step(self, step: int, values: dict[str, float]) -> None:
        self._rank_steps.write(json.dumps({"step": step, **values}) + "\n")

    def append_steps(self, records: list[dict[str, Any]]) -> None:
        with open(self.steps_jsonl, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self._rank_steps.close()


def read_rank_steps(path: Path) -> dict[int, dict[str, float]]:
    """A rank's own step file; a torn last line (process killed mid-write) is skipped."""
    out: dict[int, dict[str, float]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        out[int(record.pop("step"))] = record
    return out


def read_steps(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
