"""Reading a study folder: every run's run.json, config.yaml and steps.jsonl.

Nothing here imports torch: the records are plain JSON and YAML. A run folder
whose run.json is unreadable or lacks what a report needs is named in a
warning and left out; everything else is reported.
"""

from __future__ import annotations

import functools
import json
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scaling.records.files import flatten
from scaling.records.schema import COMM_KINDS, STRATEGY_KINDS

RUN_ID = re.compile(r"^n(?P<world_size>\d+)-r(?P<repeat>\d+)$")
CONTROL_ID = re.compile(r"^solo-b(?P<batch>\d+)-r(?P<repeat>\d+)(?:$|\.)")
"""A study's single-process control point (a failed attempt moved aside keeps the prefix)."""
KIND_NAMES = {"allreduce": "all-reduce", "allgather_fwd": "all-gather", "allgather_bwd": "all-gather",
              "reducescatter": "reduce-scatter", "broadcast": "broadcast"}
"""The collective a kind of ``comm_<kind>_*`` keys is."""
KIND_LABELS = {"allreduce": "gradient all-reduce", "allgather_fwd": "all-gather in forward",
               "allgather_bwd": "all-gather in backward", "reducescatter": "gradient reduce-scatter",
               "broadcast": "parameter broadcast"}
"""What each kind does in the step, for tables and sentences."""
REQUIRED = ("status", "world_size")
SUMMARY_REQUIRED = ("step_s", "samples_per_s")


@dataclass
class RunRecord:
    """One training job as its records describe it."""

    study: str
    folder: Path
    status: str
    """completed | failed | running (interrupted, or still running)."""
    world_size: int
    nodes: int | None
    repeat: int | None
    batch_per_rank: int | None
    global_batch: int | None
    threads_per_process: int | None
    summary: dict[str, Any]
    memory_max: dict[str, Any]
    error: str | None
    run: dict[str, Any]
    config: dict[str, Any]
    """config.yaml flattened to dotted keys."""
    measured_steps: int
    """Lines in steps.jsonl (for a failed run: the steps kept)."""
    solo_batch: int | None = None
    """A study's single-process control point (solo-b<B>-r<R>): its per-rank batch B."""

    @property
    def run_id(self) -> str:
        return self.folder.name

    @functools.cached_property
    def steps(self) -> list[dict[str, Any]]:
        """steps.jsonl: one record per measured step (a torn last line left out); read once, when asked."""
        return _read_steps(self.folder / "steps.jsonl")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def is_control(self) -> bool:
        return self.solo_batch is not None

    @property
    def controls(self) -> dict[str, Any]:
        """run.json ``controls`` (the no-communication steps); empty when the run has none."""
        value = self.run.get("controls")
        return value if isinstance(value, dict) else {}

    @property
    def strategy(self) -> str:
        """dist.strategy as asked (run.json ``strategy``); records from before the strategies ran DDP."""
        return str(self.run.get("strategy") or self.config.get("dist.strategy") or "ddp")

    @property
    def memory_model(self) -> dict[str, Any]:
        """run.json ``memory_model`` (predicted model state per rank); empty in records from before it."""
        value = self.run.get("memory_model")
        return value if isinstance(value, dict) else {}

    def model_state_bytes(self) -> float | None:
        """memory.max.model_state, or (older records) its parts: parameters, gradients, optimizer state."""
        value = self.memory_max.get("model_state")
        if isinstance(value, (int, float)):
            return value
        parts = [self.memory_max.get(k) for k in ("params", "grads", "optimizer_state")]
        return sum(parts) if all(isinstance(v, (int, float)) for v in parts) else None

    def predicted_model_state_bytes(self) -> float | None:
        """run.json memory_model.max.model_state: the model state per rank predicted for the strategy that ran."""
        return (self.memory_model.get("max") or {}).get("model_state")

    def number(self, key: str) -> float | None:
        """A summary value, or None where it is absent or null (comm keys at world size 1)."""
        value = self.summary.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def wire_bytes(self) -> float | None:
        """Bytes the comm hook put on the wire per step (comm_wire_bytes; older records: from the hook's name)."""
        wire = self.number("comm_wire_bytes")
        if wire is not None:
            return wire
        grads = self.number("comm_bytes")
        if grads is None:
            return None
        factor = WIRE_FACTOR.get(str(self.run.get("comm_hook") or "allreduce"))
        return grads * factor if factor is not None else None

    def busbw_GBps(self) -> float | None:
        """Bus bandwidth of the bytes really sent. Records with comm_wire_bytes have it so already; older
        records computed it from the gradient bytes, which overstates a compressing hook's."""
        busbw = self.number("busbw_GBps")
        if busbw is None or self.number("comm_wire_bytes") is not None:
            return busbw
        grads, wire = self.number("comm_bytes"), self.wire_bytes()
        if wire is None or not grads:
            return None
        return busbw * wire / grads


@dataclass
class StudyRecords:
    name: str
    folder: Path
    kind: str
    """strong | weak | unknown (neither batch size is fixed)."""
    kind_source: str
    """study.json, run.json, or inferred from batch sizes."""
    runs: list[RunRecord]
    """The study's points (world size N, repeat r), failed attempts included; controls apart."""
    definition: dict[str, Any]
    """study.json, when the study was run by ``scaling.study``."""
    missing_points: list[dict[str, Any]] = field(default_factory=list)
    """Points study.json lists as failed that left no run folder (the job died before making one)."""
    warnings: list[str] = field(default_factory=list)
    controls: list[RunRecord] = field(default_factory=list)
    """Single-process control points (solo-b<B>-r<R>), failed attempts included."""

    @property
    def strategy(self) -> str:
        """The dist.strategy of the study's runs (the most common, completed runs first)."""
        runs = [r for r in self.runs if r.completed] or self.runs
        return Counter(r.strategy for r in runs).most_common(1)[0][0] if runs else "ddp"

    def solo_runs(self, batch_per_rank: int | None) -> list[RunRecord]:
        """Completed single-process runs at this per-rank batch: control points, and the study's own
        world-size-1 points (which are the control for their batch)."""
        return [r for r in (*self.runs, *self.controls)
                if r.completed and r.world_size == 1 and batch_per_rank is not None
                and r.batch_per_rank == batch_per_rank]


WIRE_FACTOR = {"allreduce": 1.0, "mpi": 1.0, "fp16": 0.5, "bf16": 0.5}
"""Wire bytes per gradient byte of the built-in hooks, for records older than comm_wire_bytes (powersgd's
depends on its rank and the shapes: unknown)."""


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        text = path.read_text()
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    if not text.strip():
        return None, "is empty"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    if not isinstance(data, dict):
        return None, "is not a JSON object"
    return data, None


def _read_steps(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed job
        if isinstance(record, dict):
            out.append(record)
    return out


def _count_steps(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    count = 0
    for line in lines:
        try:
            json.loads(line)
            count += 1
        except ValueError:
            continue  # a torn last line of a killed job
    return count


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return flatten(data) if isinstance(data, dict) else {}


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_run(study: str, folder: Path) -> tuple[RunRecord | None, str | None]:
    """A run folder's records, or a warning naming what is wrong with them."""
    path = folder / "run.json"
    run, problem = _read_json(path)
    if run is None:
        return None, f"{path} {problem}; run left out"
    missing = [k for k in REQUIRED if not isinstance(run.get(k), (str, int)) or run.get(k) == ""]
    if missing:
        return None, f"{path} lacks {', '.join(missing)}; run left out"
    status = str(run["status"])
    summary = run.get("summary") if isinstance(run.get("summary"), dict) else {}
    warning = None
    if status == "completed" and any(not isinstance(summary.get(k), (int, float)) for k in SUMMARY_REQUIRED):
        warning = f"{path} says completed but its summary lacks step_s/samples_per_s; reported as incomplete"
        status = "incomplete"
    elif status == "running":
        warning = f"{path} says running: the job was interrupted (or is still running); reported as incomplete"
    memory = run.get("memory") if isinstance(run.get("memory"), dict) else {}
    match = RUN_ID.match(str(run.get("run_id", folder.name))) or RUN_ID.match(folder.name)
    control = CONTROL_ID.match(folder.name)
    record = RunRecord(
        study=study,
        folder=folder,
        status=status,
        world_size=int(run["world_size"]),
        nodes=_int_or_none(run.get("nodes")),
        repeat=int(match["repeat"]) if match else (int(control["repeat"]) if control else None),
        batch_per_rank=_int_or_none(run.get("batch_size_per_rank")),
        global_batch=_int_or_none(run.get("global_batch_size")),
        threads_per_process=_int_or_none(run.get("threads_per_process")),
        summary=summary,
        memory_max=memory.get("max") if isinstance(memory.get("max"), dict) else {},
        error=str(run["error"]) if run.get("error") else None,
        run=run,
        config=_read_config(folder / "config.yaml"),
        measured_steps=_count_steps(folder / "steps.jsonl"),
        solo_batch=int(control["batch"]) if control else None,
    )
    return record, warning


def _number_repeats(runs: list[RunRecord]) -> None:
    """Runs without an n<N>-r<R> name get repeat numbers by start time within their world size."""
    by_size: dict[int, list[RunRecord]] = {}
    for run in sorted(runs, key=lambda r: r.run.get("started_at") or 0):
        by_size.setdefault(run.world_size, []).append(run)
    for group in by_size.values():
        taken = {r.repeat for r in group if r.repeat is not None}
        free = (i for i in range(len(group) * 2) if i not in taken)
        for run in group:
            if run.repeat is None:
                run.repeat = next(free)


def infer_kind(runs: list[RunRecord]) -> str:
    """Strong when the global batch is the same at every world size, weak when the per-rank batch is."""
    sizes = {r.world_size for r in runs}
    if len(sizes) < 2:
        return "unknown"
    if len({r.global_batch for r in runs}) == 1:
        return "strong"
    if len({r.batch_per_rank for r in runs}) == 1:
        return "weak"
    return "unknown"


def load_study(folder: Path) -> StudyRecords:
    folder = Path(folder)
    warnings: list[str] = []
    definition: dict[str, Any] = {}
    if (folder / "study.json").exists():
        data, problem = _read_json(folder / "study.json")
        if data is None:
            warnings.append(f"{folder / 'study.json'} {problem}; the study's kind is taken from the runs")
        else:
            definition = data
    name = str(definition.get("name") or folder.name)
    runs: list[RunRecord] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not (sub / "run.json").exists():
            if (sub / "config.yaml").exists():
                warnings.append(f"{sub} has no run.json (the job ended before writing it); left out")
            continue
        record, warning = read_run(name, sub)
        if warning:
            warnings.append(warning)
        if record is not None:
            runs.append(record)
    controls = [r for r in runs if r.is_control]
    runs = [r for r in runs if not r.is_control]
    _number_repeats(runs)
    kind, source = _kind(definition, runs)
    present = {r.run_id for r in (*runs, *controls)}
    missing = [p for p in definition.get("points", []) if isinstance(p, dict)
               and p.get("status") == "failed" and p.get("run_id") not in present]
    return StudyRecords(name, folder, kind, source, runs, definition, missing, warnings, controls)


def _kind(definition: dict[str, Any], runs: list[RunRecord]) -> tuple[str, str]:
    if definition.get("kind") in ("strong", "weak"):
        return definition["kind"], "study.json"
    kinds = {r.run.get("study_kind") for r in runs}
    if len(kinds) == 1 and next(iter(kinds)) in ("strong", "weak"):
        return str(next(iter(kinds))), "run.json"
    return infer_kind(runs), "inferred from the batch sizes"


def common_straggler(runs: Sequence[RunRecord]) -> dict[str, Any] | None:
    """The straggler most repeats name (the median run's when they disagree)."""
    named = [r.summary["straggler"] for r in runs if isinstance(r.summary.get("straggler"), dict)]
    if not named:
        return None
    ranks = Counter(s.get("rank") for s in named).most_common()
    rank = ranks[0][0]
    same = [s for s in named if s.get("rank") == rank]
    lost = [s["lost_s"] for s in same if isinstance(s.get("lost_s"), (int, float))]
    phases = Counter(s.get("phase") for s in same if s.get("phase")).most_common()
    probed = [s["slow_host"] for s in same if isinstance(s.get("slow_host"), bool)]
    return {"rank": rank, "phase": phases[0][0] if phases else None,
            "lost_s": statistics.median(lost) if lost else None, "runs": len(same), "of": len(runs),
            "slow_host": (sum(probed) > len(probed) / 2) if probed else None}


def collectives(strategy: str) -> str:
    """The collectives a strategy communicates with, in words: "all-reduce", "all-gather and reduce-scatter"."""
    names = list(dict.fromkeys(KIND_NAMES[k] for k in STRATEGY_KINDS.get(strategy, ("allreduce",))))
    return " and ".join(names)


def kinds_of(strategy: str) -> tuple[str, ...]:
    """The ``comm_<kind>`` kinds a strategy's records hold (COMM_KINDS order)."""
    return tuple(k for k in COMM_KINDS if k in STRATEGY_KINDS.get(strategy, ()))
