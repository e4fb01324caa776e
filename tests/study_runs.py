"""Real tiny studies, run once per test session and shared by test_study.py and test_report.py.

Every point is a real torchrun job of a small MLP; the studies are kept small
because the machine running the tests may have two cores.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "SLURM_STEP_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                 "PMI_RANK", "PMIX_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_FULL_ERROR",
                 "SCALING_TEST_FAIL_WORLD_SIZE")
TINY = ["+exp=mlp", "model.hidden=256", "model.in_features=64", "train.batch_size=4", "data.num_samples=64", "train.steps=3",
        "train.warmup_steps=1", "instrument.flops=false", "logger.wandb.mode=disabled"]
FAILING_HOOK = "comm.hook=tests.study_hooks:allreduce_or_fail"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STRONG = ["study=strong", "study.name=tiny-strong", "study.nprocs=[1,2]", "study.repeats=2",
          "train.global_batch_size=8"]
# A weak study that differs from STRONG in bucket size and comm hook too (what the comparison must
# name). Its hook fails at world size 1 while SCALING_TEST_FAIL_WORLD_SIZE=1 is set: on the first
# invocation the 1-process point fails and the 2-process point completes; run again without the
# variable, only the failed point runs. The tag has HTML in it: the report must show it escaped.
HTML_TAG = '<i>a&b"c</i>'
WEAK = ["study=weak", "study.name=tiny-weak", "study.nprocs=[1,2]", "train.batch_size=4", "dist.bucket_cap_mb=1",
        FAILING_HOOK, f"logger.wandb.tags=['{HTML_TAG}']"]


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    out.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def run_study(root: Path, args: list[str], timeout_s: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scaling.study", *TINY, f"paths.root={root}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout_s)


def run_report(*args: str | Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scaling.report", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout_s)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@dataclass
class Snapshot:
    """A study folder right after one invocation of ``python -m scaling.study``."""

    dir: Path
    proc: subprocess.CompletedProcess
    entries: list[str]
    results_csv: str
    study_json: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    """Each run folder's run.json as it was then (a later invocation may move or replace the folder)."""

    def rows(self) -> list[dict[str, str]]:
        return list(csv.DictReader(self.results_csv.splitlines()))


def snapshot(study_dir: Path, proc: subprocess.CompletedProcess) -> Snapshot:
    results = study_dir / "results.csv"
    return Snapshot(study_dir, proc, sorted(p.name for p in study_dir.iterdir()),
                    results.read_text() if results.exists() else "",
                    json.loads((study_dir / "study.json").read_text()),
                    {p.name: read_run(p) for p in study_dir.iterdir() if (p / "run.json").exists()})


_made: dict[str, Any] = {}


def _once(key: str, make):
    if key not in _made:
        _made[key] = make()
    return _made[key]


def studies_root(factory: pytest.TempPathFactory) -> Path:
    return _once("root", lambda: factory.mktemp("studies"))


def strong_study(factory: pytest.TempPathFactory) -> Snapshot:
    def make() -> Snapshot:
        root = studies_root(factory)
        proc = run_study(root, STRONG)
        assert proc.returncode == 0, explain(proc)
        return snapshot(root / "tiny-strong", proc)
    return _once("strong", make)


def weak_study_failed(factory: pytest.TempPathFactory) -> Snapshot:
    """The first invocation: the 1-process point fails, the 2-process point completes."""
    def make() -> Snapshot:
        root = studies_root(factory)
        proc = run_study(root, WEAK, SCALING_TEST_FAIL_WORLD_SIZE="1")
        return snapshot(root / "tiny-weak", proc)
    return _once("weak-failed", make)


def weak_study(factory: pytest.TempPathFactory) -> Snapshot:
    """The same command again, with the failure gone: only the failed point runs, and the study completes."""
    def make() -> Snapshot:
        first = weak_study_failed(factory)
        proc = run_study(first.dir.parent, WEAK)
        return snapshot(first.dir, proc)
    return _once("weak-resumed", make)


def copy_study(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("plots", "report.*", "results.csv", ".study.lock"))
    return target


def read_run(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "run.json").read_text())


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR)."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
