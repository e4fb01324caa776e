"""Real jobs made once per test run and read by the tests of several modules (a pytest plugin,
loaded by conftest.py): the tiny strong and weak studies of test_study.py and test_report.py.

Every point is a real torchrun job of a small MLP; the studies are small because the machine
running the tests may have two cores.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.jobs import explain, read_json, read_run, study

FAILING_HOOK = "comm.hook=tests.study_hooks:allreduce_or_fail"
STRONG = ["study=strong", "study.name=tiny-strong", "study.nprocs=[1,2]", "study.repeats=2",
          "train.global_batch_size=8"]
# A weak study that differs from STRONG in bucket size and comm hook too (what the comparison must
# name). Its hook fails at world size 1 while SCALING_TEST_FAIL_WORLD_SIZE=1 is set: on the first
# invocation the 1-process point fails and the 2-process point completes; run again without the
# variable, only the failed point runs. The tag has HTML in it: the report must show it escaped.
HTML_TAG = '<i>a&b"c</i>'
WEAK = ["study=weak", "study.name=tiny-weak", "study.nprocs=[1,2]", "train.batch_size=4", "dist.bucket_cap_mb=1",
        FAILING_HOOK, f"logger.wandb.tags=['{HTML_TAG}']"]


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
                    read_json(study_dir / "study.json"),
                    {p.name: read_run(p) for p in study_dir.iterdir() if (p / "run.json").exists()})


def copy_study(source: Path, target: Path) -> Path:
    """A study's records without what the report writes, to report on again elsewhere."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("plots", "report.*", "results.csv", ".study.lock"))
    return target


@pytest.fixture(scope="session")
def studies_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("studies")


@pytest.fixture(scope="session")
def strong(studies_root: Path) -> Snapshot:
    """tiny-strong: 1 and 2 processes, two repeats each, completed."""
    proc = study(studies_root, STRONG)
    assert proc.returncode == 0, explain(proc)
    return snapshot(studies_root / "tiny-strong", proc)


@pytest.fixture(scope="session")
def weak_failed(studies_root: Path) -> Snapshot:
    """tiny-weak after its first invocation: the 1-process point failed, the 2-process point completed."""
    proc = study(studies_root, WEAK, SCALING_TEST_FAIL_WORLD_SIZE="1")
    return snapshot(studies_root / "tiny-weak", proc)


@pytest.fixture(scope="session")
def weak(weak_failed: Snapshot) -> Snapshot:
    """tiny-weak after the same command again, with the failure gone: only the failed point ran."""
    proc = study(weak_failed.dir.parent, WEAK)
    return snapshot(weak_failed.dir, proc)
