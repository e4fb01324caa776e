"""Sweeps (``-m``): real jobs and studies, one per combination, under one sweep folder."""

from __future__ import annotations

import csv
import json
import signal
import sys
from pathlib import Path

import pytest

from scaling import cli, sweep
from scaling.report.__main__ import main as report_main
from tests.jobs import QUICK, TINY, check, end_tree, load_run, measuring, single, start, wait_for

SHORT = [*TINY["mlp"], *QUICK, "instrument.ops=false", "instrument.control_steps=0"]
TRAIN_SWEEP = [*(o for o in SHORT if not o.startswith("train.batch_size=")), "train.batch_size=2,4",
               "comm.hook=allreduce,fp16"]
TRAIN_NAMES = {"batch_size-2+hook-allreduce", "batch_size-2+hook-fp16", "batch_size-4+hook-allreduce",
               "batch_size-4+hook-fp16"}


def started_at(folder: Path) -> dict[str, float]:
    return {p.name: json.loads((p / "run.json").read_text())["started_at"]
            for p in folder.rglob("*") if (p / "run.json").exists()}


def test_train_sweep_runs_every_combination_once_and_reports_along_the_axis(root: Path) -> None:
    proc = single(["-m", *TRAIN_SWEEP, f"paths.root={root}"])
    check(proc)
    folder = root / "mlp-sweep-batch_size-hook"
    runs = {p.name: load_run(p)[0] for p in folder.iterdir() if (p / "run.json").exists()}
    assert set(runs) == TRAIN_NAMES
    for name, run in runs.items():
        assert run["status"] == "completed" and run["world_size"] == 1
        assert name == f"batch_size-{run['batch_size_per_rank']}+hook-{run['comm_hook']}"
    table = list(csv.DictReader((folder / "sweep.csv").open()))
    assert sorted((r["train.batch_size"], r["comm.hook"]) for r in table) == [
        ("2", "allreduce"), ("2", "fp16"), ("4", "allreduce"), ("4", "fp16")]
    assert all(float(r["step_s"]) > 0 and r["bound"] for r in table)
    assert {p.name for p in (folder / "plots").iterdir()} >= {"sweep-breakdown.png", "sweep-step.png",
                                                               "sweep-bound.png"}
    assert json.loads((folder / "sweep.json").read_text())["status"] == "completed"
    (folder / "sweep.csv").unlink()
    assert report_main([str(folder)]) == 0  # the sweep's report again, from the records
    assert len(list(csv.DictReader((folder / "sweep.csv").open()))) == 4

    before = started_at(folder)
    again = single(["-m", *TRAIN_SWEEP, f"paths.root={root}"])
    check(again)
    assert again.stdout.count("completed earlier, skipped") == 4
    assert "0 run, 4 completed earlier and skipped" in again.stdout
    assert started_at(folder) == before

    # The same combinations with other settings would mix two experiments in one folder: refused, nothing runs.
    changed = single(["-m", *TRAIN_SWEEP, "train.steps=5", f"paths.root={root}"])
    assert changed.returncode == 2
    assert "was run with other settings (train.steps: 4 then, 5 now)" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
    assert started_at(folder) == before


def test_study_sweep_makes_a_study_per_combination_and_one_comparison(root: Path) -> None:
    overrides = [*(o for o in SHORT if not o.startswith("train.batch_size=")), "study=weak", "study.nprocs=[1]",
                 "train.batch_size=2,4", "dist.bucket_cap_mb=1,25", f"paths.root={root}"]
    proc = single(["-m", *overrides], module="scaling.study", timeout=600)
    check(proc)
    folder = root / "mlp-weak-sweep-batch_size-bucket_cap_mb"
    studies = sorted(p.name for p in folder.iterdir() if (p / "study.json").exists())
    assert studies == ["batch_size-2+bucket_cap_mb-1", "batch_size-2+bucket_cap_mb-25",
                       "batch_size-4+bucket_cap_mb-1", "batch_size-4+bucket_cap_mb-25"]
    for name in studies:
        run, _ = load_run(folder / name / "n1-r0")
        assert run["status"] == "completed"
        assert name == f"batch_size-{run['batch_size_per_rank']}+bucket_cap_mb-{run['bucket_cap_mb']}"
    compare = folder / "compare"
    rows = list(csv.DictReader((compare / "results.csv").open()))
    assert len(rows) == 4
    report_md = (compare / "report.md").read_text()
    assert "dist.bucket_cap_mb" in report_md and "train.batch_size" in report_md
    (compare / "results.csv").unlink()
    assert report_main([str(folder)]) == 0
    assert len(list(csv.DictReader((compare / "results.csv").open()))) == 4

    before = started_at(folder)
    again = single(["-m", *overrides], module="scaling.study", timeout=600)
    check(again)
    assert again.stdout.count("completed earlier, skipped") == 4
    assert started_at(folder) == before


def test_a_bad_sweep_value_fails_before_anything_runs(root: Path) -> None:
    proc = single(["-m", *TRAIN_SWEEP[:-2], "train.batch_size=2,0", f"paths.root={root}"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("scaling.train: error: combination batch_size-0: train.batch_size must be an "
                                   "integer >= 1 (got 0); nothing was run")
    assert not root.exists()
    proc = single(["-m", *SHORT, "model=mlp,nosuch", f"paths.root={root}"])
    assert proc.returncode == 2 and "model=nosuch: no such option" in proc.stderr
    assert not root.exists()


def test_combination_names_never_collide() -> None:
    keys, batches = sweep.expand(["+exp=mlp", "comm.hook=a/b,a-b,'a b'", "train.batch_size=range(1,3)"])
    assert keys == ["comm.hook", "train.batch_size"]
    names = [c.name for c in sweep.name_combinations(keys, batches)]
    assert len(names) == len(set(names)) == 6
    assert "hook-a-b+batch_size-1" not in names  # three values share it: each gets a hash of its own values
    keys, batches = sweep.expand(["+exp=mlp", "model=glob(m*)"])
    assert [c.name for c in sweep.name_combinations(keys, batches)] == ["model-mlp"]


def test_hydra_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run("scaling.train", lambda cfg: 0, argv=["--help"]) == 0
    out = capsys.readouterr().out
    assert "model={mlp,resnet18,resnet50,transformer}" in out and "mlp, resnet, transformer" in out
    assert "-m, --multirun" in out
    assert cli.run("scaling.train", lambda cfg: 0, argv=["+exp=mlp", "--cfg", "job"]) == 0
    assert "kind: mlp" in capsys.readouterr().out
    assert cli.run("scaling.train", lambda cfg: 0, argv=["+exp=mlp", "--info"]) == 0
    assert "model: mlp" in capsys.readouterr().out
    assert cli.run("scaling.train", lambda cfg: 0, argv=["--nosuch"]) == 2
    assert capsys.readouterr().err == ("scaling.train: error: unknown flag --nosuch; supported: -m/--multirun, "
                                       "--cfg job, --info, -h/--help\n")
    assert cli.run("scaling.commbench", lambda cfg: 0, "commbench", argv=["-m", "x=1,2"]) == 2
    assert "has no -m" in capsys.readouterr().err


def test_a_stopped_train_sweep_records_the_stop_and_continues_where_it_stopped(root: Path) -> None:
    endless = [o for o in SHORT if not o.startswith(("train.steps=", "train.log_every="))]
    overrides = ["-m", *endless, "train.steps=100000", "train.log_every=1000", "train.seed=0,1", f"paths.root={root}"]
    proc = start([sys.executable, "-m", "scaling.train", *overrides], merge_stderr=True)
    folder = root / "mlp-sweep-seed"
    try:
        # Stopped while training (its first steps are on disk), however long its start-up took on this machine.
        assert wait_for(lambda: measuring(folder / "seed-0") or proc.poll() is not None, 180, every_s=0.2), "never measured"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        end_tree(proc)
    assert proc.returncode == 3, out
    run, _ = load_run(folder / "seed-0")
    assert run["status"] == "failed" and "SIGTERM" in run["error"]
    assert not (folder / "seed-1").exists()

    # Run again (shorter): the cut-short job is moved aside and run again, then the other one.
    quick = [o if not o.startswith("train.steps=") else "train.steps=4" for o in overrides]
    again = single(quick)
    check(again)
    assert "seed-0: an earlier attempt failed or was cut short; moved aside, running again" in again.stdout
    assert [load_run(folder / f"seed-{s}")[0]["status"] for s in (0, 1)] == ["completed", "completed"]
    assert len(list(folder.glob("seed-0.failed-*"))) == 1
