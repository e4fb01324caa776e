"""Measured points for the predictor: one completed run each, read from its records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.records.files import BUCKETS_JSON, RUN_JSON, read_json


@dataclass(frozen=True)
class Bucket:
    """One row of buckets.json (launch order)."""

    index: int
    bytes: int
    wire_bytes: int
    ready_s: float
    allreduce_s: float


@dataclass
class Point:
    """A completed run: its medians, its no-comm control and its bucket timeline."""

    folder: Path
    world_size: int
    nodes: int
    batch_per_rank: int
    kind: str
    hook: str
    bucket_cap_mb: float
    is_control: bool
    summary: dict[str, Any]
    nocomm_step_s: float | None
    buckets: list[Bucket] = field(default_factory=list)

    def get(self, key: str) -> float:
        value = self.summary.get(key)
        return float(value) if value is not None else 0.0

    @property
    def step_s(self) -> float:
        return self.get("step_s")

    @property
    def exposed_buckets_s(self) -> float:
        """Exposed time of the gradient buckets: exposed communication less the buffer broadcast."""
        return max(0.0, self.get("comm_exposed_s") - self.get("comm_sync_s"))

    @property
    def nocomm_s(self) -> float:
        """The step without communication: the control when there is one, else step less exposed."""
        if self.world_size == 1:
            return self.step_s
        if self.nocomm_step_s is not None:
            return self.nocomm_step_s
        return self.step_s - self.get("comm_exposed_s")

    @property
    def interference_s(self) -> float:
        """What communication costs beyond its exposed time (compute slowed by the backend's work)."""
        if self.world_size == 1 or self.nocomm_step_s is None:
            return 0.0
        return self.step_s - self.get("comm_exposed_s") - self.nocomm_step_s

    @property
    def fixed_s(self) -> float:
        """The parts of a step that do not grow with the batch: data, optimizer, framework overhead."""
        return self.get("data_s") + self.get("optimizer_s") + self.get("other_s")


def load_point(folder: Path) -> Point | None:
    """A completed run's point, or None when the folder holds no completed run."""
    try:
        run = read_json(folder / RUN_JSON)
    except ValueError:
        return None
    if run.get("status") != "completed" or not run.get("summary") or not run.get("instrumented", True):
        return None
    buckets = []
    if (folder / BUCKETS_JSON).exists():
        buckets = [Bucket(int(b["index"]), int(b["bytes"]), int(b["wire_bytes"]), float(b["ready_s"]),
                          float(b["allreduce_s"]))
                   for b in read_json(folder / BUCKETS_JSON).get("buckets", [])]
    controls = run.get("controls") or {}
    return Point(folder=folder, world_size=int(run["world_size"]), nodes=int(run.get("nodes") or 1),
                 batch_per_rank=int(run["batch_size_per_rank"]), kind=str(run.get("study_kind") or "adhoc"),
                 hook=str(run.get("comm_hook") or "allreduce"), bucket_cap_mb=float(run.get("bucket_cap_mb") or 25),
                 is_control=folder.name.startswith("solo-"), summary=run["summary"],
                 nocomm_step_s=controls.get("nocomm_step_s"), buckets=buckets)


def find_points(paths: list[Path]) -> list[Point]:
    """Every completed run in the given run folders or study folders (one level down)."""
    points: list[Point] = []
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory (expected a run folder or a study folder)")
        folders = [path] if (path / RUN_JSON).exists() else sorted(p for p in path.iterdir() if p.is_dir())
        points.extend(p for p in (load_point(f) for f in folders) if p is not None)
    return points
