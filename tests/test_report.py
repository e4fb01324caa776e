"""``python -m scaling.report``: the numbers it writes are the SPEC definitions applied to the records.

Uses the real studies of tests/study_runs.py (shared with test_study.py).
"""

from __future__ import annotations

import csv
import html
import json
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pytest

from scaling.report.__main__ import main as report_main
from tests.study_runs import (HTML_TAG, PNG_SIGNATURE, REPO, copy_study, env, explain, png_size, read_run,
                              run_report, strong_study, weak_study, weak_study_failed)

PLOTS = ("throughput.png", "efficiency.png", "breakdown.png", "memory.png", "communication.png")
SUMMARY_COLUMNS = ("step_s", "samples_per_s", "compute_frac", "comm_exposed_frac", "data_frac", "other_frac",
                   "comm_s", "comm_exposed_s", "overlap", "busbw_GBps")


@pytest.fixture(scope="module")
def strong(tmp_path_factory):
    return strong_study(tmp_path_factory)


@pytest.fixture(scope="module")
def weak_failed(tmp_path_factory):
    """tiny-weak after its first invocation: the 1-process point failed."""
    return weak_study_failed(tmp_path_factory)


@pytest.fixture(scope="module")
def weak(weak_failed, tmp_path_factory):
    """tiny-weak after the same command again: the failed point reran, the study is complete."""
    return weak_study(tmp_path_factory)


@pytest.fixture(scope="module")
def comparison(strong, weak, tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison")
    proc = run_report(strong.dir, weak.dir, "--out", out)
    assert proc.returncode == 0, explain(proc)
    return out, proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def median_step_s(study_dir: Path, world_size: int) -> float:
    """T(N): the median over repeats of each completed run's median step time."""
    times = [read_run(p)["summary"]["step_s"] for p in study_dir.glob(f"n{world_size}-r*")
             if (p / "run.json").exists() and read_run(p)["status"] == "completed"]
    return statistics.median(times)


# -- results.csv ------------------------------------------------------------------------------


def test_strong_results_csv_equals_the_definitions_recomputed_from_run_json(strong):
    rows = read_csv(strong.dir / "results.csv")
    assert sorted(r["run_id"] for r in rows) == ["n1-r0", "n1-r1", "n2-r0", "n2-r1"]
    t_base = median_step_s(strong.dir, 1)
    for row in rows:
        run = read_run(strong.dir / row["run_id"])
        n = run["world_size"]
        for key in SUMMARY_COLUMNS:
            assert float(row[key]) == pytest.approx(run["summary"][key], rel=1e-12), (row["run_id"], key)
        assert (row["bound"], row["status"], row["kind"], row["study"]) == (run["summary"]["bound"], "completed",
                                                                            "strong", "tiny-strong")
        assert int(row["world_size"]) == n and int(row["repeat"]) == int(row["run_id"][-1])
        assert int(row["peak_memory_bytes"]) == run["memory"]["max"]["peak"]
        speedup = t_base / run["summary"]["step_s"]
        assert float(row["speedup"]) == pytest.approx(speedup, rel=1e-12)
        assert float(row["efficiency"]) == pytest.approx(speedup * 1 / n, rel=1e-12)


def test_strong_per_rank_batch_halves_in_results_csv(strong):
    batches = {(int(r["world_size"]), int(r["batch_size_per_rank"]), int(r["global_batch_size"]))
               for r in read_csv(strong.dir / "results.csv")}
    assert batches == {(1, 8, 8), (2, 4, 8)}


def test_weak_results_csv_equals_the_definitions_recomputed_from_run_json(weak):
    rows = {r["run_id"]: r for r in read_csv(weak.dir / "results.csv") if r["status"] == "completed"}
    assert sorted(rows) == ["n1-r0", "n2-r0"]
    t_base = median_step_s(weak.dir, 1)
    for run_id, row in rows.items():
        run = read_run(weak.dir / run_id)
        n = run["world_size"]
        efficiency = t_base / run["summary"]["step_s"]
        assert float(row["efficiency"]) == pytest.approx(efficiency, rel=1e-12)
        assert float(row["speedup"]) == pytest.approx(efficiency * n / 1, rel=1e-12), "scaled speedup"
        assert (int(row["batch_size_per_rank"]), int(row["global_batch_size"])) == (4, 4 * n)
        assert float(row["step_s"]) == pytest.approx(run["summary"]["step_s"], rel=1e-12)


def test_table_shows_speedup_of_the_medians_over_repeats(strong):
    """The scaling table's point value is T(b)/T(N) with medians over repeats, with the min-max of the repeats."""
    speedup = median_step_s(strong.dir, 1) / median_step_s(strong.dir, 2)
    row = next(line for line in (strong.dir / "report.md").read_text().splitlines() if line.startswith("| 2 | 4 | 8 |"))
    assert f"| {speedup:.2f}x (" in row
    assert f"| {100 * speedup / 2:.0f}% (" in row


# -- report files -----------------------------------------------------------------------------


def test_report_writes_markdown_html_and_every_plot_as_a_real_png(strong):
    for name in PLOTS:
        path = strong.dir / "plots" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        width, height = png_size(path)
        assert width >= 600 and height >= 400, (name, width, height)
        assert path.stat().st_size > 10_000, f"{name} looks empty"
    md = (strong.dir / "report.md").read_text()
    assert all(f"(plots/{name})" in md for name in PLOTS)
    assert "## Findings" in md and "Strong scaling (global batch 8 fixed)" in md


def test_html_is_self_contained(strong):
    page = (strong.dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    assert 'src="plots/' not in page and "http" not in page.split("<body>")[1]


def test_html_escapes_config_values(weak):
    page = (weak.dir / "report.html").read_text()
    assert "<i>" not in page
    assert html.escape(json.dumps([HTML_TAG]), quote=True) in page, "the tags list, escaped"


def test_findings_explain_the_study_in_plain_words(strong):
    md = (strong.dir / "report.md").read_text()
    assert "bound" in md.split("## Findings")[1].split("##")[0]
    assert "thread(s) per process at every world size" in md


# -- failures ---------------------------------------------------------------------------------


def test_failed_run_is_a_row_with_its_status_and_cause(weak_failed):
    rows = {r["run_id"]: r for r in weak_failed.rows()}
    assert rows["n1-r0"]["status"] == "failed" and "injected failure" in rows["n1-r0"]["error"]
    assert rows["n1-r0"]["step_s"] == "" and rows["n1-r0"]["speedup"] == ""
    assert rows["n2-r0"]["status"] == "completed"
    assert "Point n1-r0 failed" in weak_failed.proc.stdout
    assert "The baseline is 2 processes because no run at 1 completed" in weak_failed.proc.stdout


def test_superseded_failed_attempt_stays_in_results_but_not_in_the_numbers(weak):
    rows = weak.rows()
    statuses = sorted((r["run_id"].split(".")[0], r["status"]) for r in rows)
    assert statuses == [("n1-r0", "completed"), ("n1-r0", "failed"), ("n2-r0", "completed")]
    assert "Point n1-r0 failed" not in weak.proc.stdout
    completed = {r["run_id"]: r for r in rows if r["status"] == "completed"}
    t_base = read_run(weak.dir / "n1-r0")["summary"]["step_s"]  # the rerun is the baseline, not the failed attempt
    assert float(completed["n2-r0"]["efficiency"]) == pytest.approx(
        t_base / read_run(weak.dir / "n2-r0")["summary"]["step_s"], rel=1e-12)


def test_corrupt_run_json_is_named_and_the_rest_is_reported(strong, tmp_path):
    study = copy_study(strong.dir, tmp_path / "tiny-strong")
    broken = study / "n2-r1" / "run.json"
    broken.write_text(broken.read_text()[: len(broken.read_text()) // 2])
    proc = run_report(study)
    assert proc.returncode == 0, explain(proc)
    assert str(broken) in proc.stdout and "not valid JSON" in proc.stdout
    rows = read_csv(study / "results.csv")
    assert sorted(r["run_id"] for r in rows) == ["n1-r0", "n1-r1", "n2-r0"]
    assert str(broken) in (study / "report.md").read_text()


# -- several studies --------------------------------------------------------------------------


def test_comparison_names_the_keys_that_differ(comparison):
    out, proc = comparison
    md = (out / "report.md").read_text()
    differs = md.split("## What differs between the studies")[1].split("##")[0]
    keys = [line.split("|")[1].strip() for line in differs.splitlines() if line.startswith("| ") and "---" not in line]
    assert {"dist.bucket_cap_mb", "comm.hook", "study.kind", "train.global_batch_size"} <= set(keys)
    assert "model.hidden" not in keys and "paths.run_id" not in keys and "study.name" not in keys
    bucket = next(line for line in differs.splitlines() if line.startswith("| dist.bucket_cap_mb "))
    assert "| 25 |" in bucket and "| 1 |" in bucket
    assert "dist.bucket_cap_mb" in proc.stdout


def test_comparison_has_one_table_and_overlaid_curves(comparison, strong, weak):
    out, _ = comparison
    rows = read_csv(out / "results.csv")
    assert {r["study"] for r in rows} == {"tiny-strong", "tiny-weak"}
    assert len(rows) == len(strong.rows()) + len(weak.rows())
    for name in PLOTS:
        assert (out / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE


# -- the command ------------------------------------------------------------------------------


def test_report_never_imports_torch(strong, tmp_path):
    study = copy_study(strong.dir, tmp_path / "s")
    code = ("import sys\nfrom scaling.report.__main__ import main\nassert main([sys.argv[1]]) == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, str(study)], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, explain(proc)


def test_wandb_flag_publishes_through_scaling_wandb_report(strong, tmp_path, monkeypatch, capsys):
    study = copy_study(strong.dir, tmp_path / "s")
    calls = []
    module = types.ModuleType("scaling.wandb_report")
    module.publish = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "scaling.wandb_report", module)
    assert report_main([str(study), "--wandb"]) == 0
    assert len(calls) == 1
    assert calls[0]["results_csv"] == study / "results.csv"
    assert len(calls[0]["rows"]) == 4 and sorted(p.name for p in calls[0]["plots"]) == sorted(PLOTS)


def test_wandb_flag_without_wandb_support_says_so(strong, tmp_path, monkeypatch, capsys):
    study = copy_study(strong.dir, tmp_path / "s")
    monkeypatch.setitem(sys.modules, "scaling.wandb_report", None)  # import fails, as when not installed
    assert report_main([str(study), "--wandb"]) == 0
    assert "wandb support is not installed" in capsys.readouterr().err


def test_missing_study_folder_is_one_line(tmp_path):
    proc = run_report(tmp_path / "nope")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
