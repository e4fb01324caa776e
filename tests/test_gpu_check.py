"""scripts/gpu_check: what a machine without a GPU can show of it.

Without CUDA it says so in one line and exits non-zero; a missing dependency and an unknown group
are one line too; rows reach the --out file as they finish; groups left out (not selected, too few
GPUs, past the deadline) are listed as not run; a failing group does not hide the next. The rows
themselves need a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_non_zero(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--only", "ops", "--out", str(out)], cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("gpu_check: error: no CUDA device visible (torch ")
    assert not out.exists()


def test_a_missing_dependency_is_one_line(gpu_check, monkeypatch, capsys):
    assert gpu_check.missing_dependencies(lambda module: module not in ("hydra", "antlr4")) == [
        "hydra-core==1.3.2", "antlr4-python3-runtime==4.9.3"]
    monkeypatch.setattr(gpu_check, "missing_dependencies", lambda: ["hydra-core==1.3.2"])
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "lacks hydra-core==1.3.2" in err and "scripts/make_wheels.sh" in err


def test_an_unknown_group_is_one_line(gpu_check, capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--only", "ops,nosuch"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such group ['nosuch']" in err[0] and "multi_gpu" in err[0]


def test_a_torch_other_than_cis_is_named(gpu_check):
    assert gpu_check.torch_warning("2.14.1+cu130") is None
    assert gpu_check.torch_warning("2.11.0+cu130") == ("gpu_check: warning: torch 2.11.0+cu130 is not CI's (2.14.1): "
                                                       "a failing row may be this torch's difference")


def test_every_group_has_its_rows(gpu_check):
    assert all(callable(gpu_check.group_function(name)) for name in gpu_check.GROUPS)


def test_rows_stream_out_and_groups_left_out_are_listed(gpu_check, tmp_path):
    out = tmp_path / "rows.json"
    seen_by_later: list[list[str]] = []

    def first(check, root):
        check.row("first", "a row", "1", "1", True)

    def later(check, root):
        seen_by_later.append([r["check"] for r in json.loads(out.read_text())["rows"]])
        check.row("later", "another", "2", "2", True)

    def broken(check, root):
        raise RuntimeError("exit 1: the job failed")

    groups = {"first": ("one row", 1, 1), "skipped": ("never selected", 1, 1), "broken": ("raises", 1, 1),
              "later": ("reads the file", 1, 1), "two": ("needs two GPUs", 2, 1), "long": ("past the deadline", 1, 999)}
    functions = {"first": first, "broken": broken, "later": later}
    check = gpu_check.Check(out, {"torch": "x"})
    complete = gpu_check.run_groups(check, ["first", "broken", "later", "two", "long"], tmp_path, gpus=1, steps=1,
                                    deadline=gpu_check.Deadline(60), groups=groups, function=functions.__getitem__)
    assert seen_by_later == [["first", "skipped", "broken"]]  # on disk before the next group ran
    written = json.loads(out.read_text())
    assert written["torch"] == "x"
    assert [(r["check"], r["status"], r.get("reason")) for r in written["rows"]] == [
        ("first", "pass", None), ("skipped", "not run", "not selected (--only)"), ("broken", "fail", None),
        ("later", "pass", None), ("two", "not run", "needs 2 GPUs, 1 visible"),
        ("long", "not run", "deadline: 60 s left, the group takes about 999 s")]
    assert not complete and not check.passed
