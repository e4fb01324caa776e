"""``python -m scaling.report``: the numbers it writes are the definitions of docs/contract.md applied to the records.

Uses the real studies of tests/shared_runs.py (shared with test_study.py).
"""

from __future__ import annotations

import csv
import html
import json
import re
import statistics
import sys
import types
from pathlib import Path

import pytest

from scaling.report.__main__ import main as report_main
from scaling.report.waterfall import TERMS
from scaling.sinks import console
from tests.jobs import PNG_SIGNATURE, explain, png_size, read_run, report as run_report, run_command
from tests.shared_runs import HTML_TAG, copy_study

PLOTS = ("throughput.png", "efficiency.png", "breakdown.png", "memory.png", "communication.png", "waterfall.png",
         "roofline.png", "timeline.png")
SUMMARY_COLUMNS = ("step_s", "samples_per_s", "compute_frac", "comm_exposed_frac", "data_frac", "other_frac",
                   "comm_s", "comm_exposed_s", "overlap", "busbw_GBps")


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
    everything = read_csv(strong.dir / "results.csv")
    rows = [r for r in everything if r["role"] == "point"]
    assert sorted(r["run_id"] for r in rows) == ["n1-r0", "n1-r1", "n2-r0", "n2-r1"]
    assert sorted(r["run_id"] for r in everything if r["role"] == "control") == ["solo-b4-r0", "solo-b4-r1"]
    t_base = median_step_s(strong.dir, 1)
    for row in rows:
        run = read_run(strong.dir / row["run_id"])
        n = run["world_size"]
        for key in SUMMARY_COLUMNS:
            if run["summary"][key] is None:  # communication at world size 1: no peer
                assert n == 1 and row[key] == "", (row["run_id"], key)
                continue
            assert float(row[key]) == pytest.approx(run["summary"][key], rel=1e-12), (row["run_id"], key)
        assert (row["bound"], row["status"], row["kind"], row["study"]) == (run["summary"]["bound"], "completed",
                                                                            "strong", "tiny-strong")
        assert int(row["world_size"]) == n and int(row["repeat"]) == int(row["run_id"][-1])
        assert int(row["peak_memory_bytes"]) == run["memory"]["max"]["peak"]
        speedup = t_base / run["summary"]["step_s"]
        assert float(row["speedup"]) == pytest.approx(speedup, rel=1e-12)
        assert float(row["efficiency"]) == pytest.approx(speedup * 1 / n, rel=1e-12)


def test_strong_loss_columns_add_up_to_the_measured_loss(strong):
    """T(N) - T_ideal(N), recomputed from run.json, is what the loss columns of every point row add up to; the
    batch term is the solo-b4 controls' median step against T_ideal(2) = T(1)/2."""
    rows = [r for r in read_csv(strong.dir / "results.csv") if r["role"] == "point"]
    t_base = median_step_s(strong.dir, 1)
    for row in rows:
        n = int(row["world_size"])
        measured, ideal = median_step_s(strong.dir, n), t_base / n
        assert float(row["world_step_s"]) == pytest.approx(measured, rel=1e-12)
        assert float(row["ideal_step_s"]) == pytest.approx(ideal, rel=1e-12)
        assert row["loss_unsplit_s"] == "", "every control ran"
        total = sum(float(row[f"loss_{term}_s"]) for term in TERMS)
        assert abs(total - (measured - ideal)) < 1e-9, row["run_id"]
    solo = statistics.median(read_run(strong.dir / f"solo-b4-r{r}")["summary"]["step_s"] for r in (0, 1))
    two = next(r for r in rows if r["world_size"] == "2")
    assert float(two["loss_batch_s"]) == pytest.approx(solo - t_base / 2, rel=1e-9)
    nocomm = statistics.median(read_run(strong.dir / f"n2-r{r}")["controls"]["nocomm_step_s"] for r in (0, 1))
    exposed = statistics.median(read_run(strong.dir / f"n2-r{r}")["summary"]["comm_exposed_s"] for r in (0, 1))
    assert float(two["loss_interference_s"]) == pytest.approx(median_step_s(strong.dir, 2) - nocomm - exposed,
                                                              rel=1e-9, abs=1e-12)
    md = (strong.dir / "report.md").read_text()
    assert "## Why efficiency is lost" in md and "points of efficiency lost at 2 processes" in md


def test_strong_per_rank_batch_halves_in_results_csv(strong):
    batches = {(int(r["world_size"]), int(r["batch_size_per_rank"]), int(r["global_batch_size"]))
               for r in read_csv(strong.dir / "results.csv") if r["role"] == "point"}
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
    """The scaling table's point value is T(b)/T(N) with medians over repeats, then its interval (±) and the
    min-max of the repeats."""
    speedup = median_step_s(strong.dir, 1) / median_step_s(strong.dir, 2)
    row = next(line for line in (strong.dir / "report.md").read_text().splitlines() if line.startswith("| 2 | 4 | 8 |"))
    assert f"| {speedup:.2f}x ±" in row
    assert f"| {100 * speedup / 2:.0f}% ±" in row


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


def test_findings_say_what_limits_the_compute_at_each_end(strong):
    """The op profile's memory-bound share of compute-operator time, as each size's runs recorded it."""
    findings = (strong.dir / "report.md").read_text().split("## Findings")[1].split("##")[0]
    line = next(l for l in findings.splitlines() if "Compute is" in l)
    by_size: dict[int, list[tuple[float, float]]] = {}
    for run_json in strong.dir.glob("n*-r*/run.json"):
        summary = json.loads(run_json.read_text())["summary"]
        by_size.setdefault(summary_size(run_json), []).append((summary["memory_frac"], summary["arithmetic_frac"]))
    for world_size in (min(by_size), max(by_size)):
        memory = statistics.median(m for m, _ in by_size[world_size])
        arithmetic = statistics.median(a for _, a in by_size[world_size])
        found = re.search(rf"(\d+)% at {world_size} process", line)
        assert found and int(found.group(1)) == round(100 * memory / (memory + arithmetic)), line


def summary_size(run_json: Path) -> int:
    return json.loads(run_json.read_text())["world_size"]


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
    assert sorted(r["run_id"] for r in rows if r["role"] == "point") == ["n1-r0", "n1-r1", "n2-r0"]
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
    proc = run_command([sys.executable, "-c", code, str(study)], 300)
    assert proc.returncode == 0, explain(proc)


def test_wandb_flag_publishes_through_scaling_wandb_report(strong, tmp_path, monkeypatch, capsys):
    study = copy_study(strong.dir, tmp_path / "s")
    calls = []
    module = types.ModuleType("scaling.report.wandb_publish")
    module.publish = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "scaling.report.wandb_publish", module)
    assert report_main([str(study), "--wandb"]) == 0
    assert len(calls) == 1
    assert calls[0]["results_csv"] == study / "results.csv"
    assert len(calls[0]["rows"]) == 6 and sorted(p.name for p in calls[0]["plots"]) == sorted(PLOTS)


def test_wandb_flag_without_wandb_support_says_so(strong, tmp_path, monkeypatch, capsys):
    study = copy_study(strong.dir, tmp_path / "s")
    monkeypatch.setitem(sys.modules, "scaling.report.wandb_publish", None)  # import fails, as when not installed
    assert report_main([str(study), "--wandb"]) == 0
    assert "wandb support is not installed" in capsys.readouterr().err


def test_missing_study_folder_is_one_line(tmp_path):
    proc = run_report(tmp_path / "nope")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


# -- why efficiency is lost: the waterfall on records worked out by hand ------------------------


def write_run(study: Path, run_id: str, world_size: int, batch: int, global_batch: int, summary: dict,
              controls: dict | None = None, hook: str = "allreduce") -> None:
    """A completed run.json as the training job writes it; at world size 1 every comm key is null."""
    peer = world_size > 1
    comm = {k: (summary.get(k) if peer else None) for k in ("comm_s", "comm_exposed_s", "comm_wait_s", "comm_sync_s",
                                                           "overlap", "comm_bytes", "comm_wire_bytes", "comm_buckets",
                                                           "algbw_GBps", "busbw_GBps", "comm_wait_frac")}
    full = {"samples_per_s": global_batch / summary["step_s"], "compute_frac": 0.6, "comm_exposed_frac": 0.2 if peer
            else 0.0, "data_frac": 0.1, "other_frac": 0.1 if peer else 0.3, "bound": "compute", "straggler": None,
            **summary, **comm}
    folder = study / run_id
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({
        "status": "completed", "run_id": run_id, "world_size": world_size, "nodes": 1, "backend": "gloo",
        "launcher": "torchrun" if peer else "single", "batch_size_per_rank": batch, "global_batch_size": global_batch,
        "threads_per_process": 1, "comm_hook": hook, "summary": full, "controls": controls,
        "memory": {"max": {"params": 1000, "grads": 1000, "optimizer_state": 0, "activations": 10,
                           "comm_buffers": 1000 if peer else None, "peak": 5000, "rss_peak": 9000}}}))


def hand_study(root: Path, with_controls: bool = True) -> Path:
    """Strong scaling of a global batch of 8 over 1 and 2 processes, in seconds per step:

    T(1) = 0.100, so T_ideal(2) = 0.050; T(2) = 0.160: 0.110 lost, 68.75 points of efficiency (100 x 0.110/0.160).
    solo-b4 (one process at the per-rank batch of 2 processes): S = 0.058, data 0.003, other 0.001.
    At 2 processes: no-comm control C = 0.081, data 0.006, other 0.004, exposed 0.052 of which waiting 0.012.

      smaller batch  S - T_ideal                   = 0.058 - 0.050                 = 0.008   5.0   points
      contention     C - S - d - o                 = 0.081 - 0.058 - 0.003 - 0.003 = 0.017  10.625
      data           d = 0.006 - 0.003             =                                 0.003   1.875
      other          o = 0.004 - 0.001             =                                 0.003   1.875
      interference   T - C - exposed               = 0.160 - 0.081 - 0.052         = 0.027  16.875
      exposed        comm_exposed - comm_wait      = 0.052 - 0.012                 = 0.040  25.0
      waiting        comm_wait                     =                                 0.012   7.5
                                                                             sum     = 0.110  68.75
    """
    study = root / "hand"
    study.mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"name": "hand", "kind": "strong", "nprocs": [1, 2], "repeats": 1,
                                                  "controls": with_controls}))
    write_run(study, "n1-r0", 1, 8, 8, {"step_s": 0.100, "data_s": 0.004, "other_s": 0.002},
              controls={"steps": 5, "nocomm_step_s": 0.099, "per_rank_step_s": [0.099]} if with_controls else None)
    write_run(study, "n2-r0", 2, 4, 8, {
        "step_s": 0.160, "data_s": 0.006, "other_s": 0.004, "comm_s": 0.060, "comm_exposed_s": 0.052,
        "comm_wait_s": 0.012, "comm_wait_frac": 0.075, "overlap": 0.1333, "comm_bytes": 2e6, "comm_wire_bytes": 2e6,
        "comm_buckets": 2, "busbw_GBps": 0.0333, "bound": "straggler",
        "straggler": {"rank": 1, "phase": "optimizer", "lost_s": 0.011}},
        controls={"steps": 5, "nocomm_step_s": 0.081, "per_rank_step_s": [0.080, 0.082]} if with_controls else None)
    if with_controls:
        write_run(study, "solo-b4-r0", 1, 4, 4, {"step_s": 0.058, "data_s": 0.003, "other_s": 0.001})
    return study


HAND_TERMS_S = {"batch": 0.008, "contention": 0.017, "data": 0.003, "other": 0.003, "interference": 0.027,
                "comm_exposed": 0.040, "comm_wait": 0.012}


def report_in_process(study: Path, capsys) -> str:
    assert report_main([str(study)]) == 0
    return capsys.readouterr().out


def test_waterfall_splits_the_lost_time_as_worked_out_by_hand(tmp_path, capsys):
    study = hand_study(tmp_path)
    out = report_in_process(study, capsys)
    rows = {r["run_id"]: r for r in read_csv(study / "results.csv")}
    two = rows["n2-r0"]
    assert float(two["world_step_s"]) == 0.160 and float(two["ideal_step_s"]) == pytest.approx(0.050, abs=1e-15)
    for term, seconds in HAND_TERMS_S.items():
        assert float(two[f"loss_{term}_s"]) == pytest.approx(seconds, abs=1e-12), term
    assert sum(float(two[f"loss_{t}_s"]) for t in HAND_TERMS_S) == pytest.approx(0.160 - 0.050, abs=1e-12)
    assert two["loss_unsplit_s"] == ""
    one = rows["n1-r0"]
    assert all(float(one[f"loss_{t}_s"]) == 0.0 for t in HAND_TERMS_S), "the 1-process baseline loses nothing"
    # Points rounded so that they add up to the 69 shown (68.75 exactly).
    sentence = ("Of the 69 points of efficiency lost at 2 processes (efficiency 31%): 5 smaller batch, 11 contention, "
                "2 data loading, 2 framework overhead, 17 interference, 25 exposed all-reduce, "
                "7 waiting for rank 1, slow in optimizer.")
    assert sentence in out
    md = (study / "report.md").read_text()
    assert sentence in md
    table = md.split("## Why efficiency is lost")[1].split("\n## ")[0]
    assert "| + contention | 17.0 ms (+10.6 pts) |" in table and "| = measured step T | 160.0 ms |" in table
    assert "| efficiency T_ideal/T | 31% |" in table
    assert (study / "plots" / "waterfall.png").read_bytes()[:8] == PNG_SIGNATURE


def test_the_control_point_is_a_row_but_not_a_point_of_the_curve(tmp_path, capsys):
    study = hand_study(tmp_path)
    out = report_in_process(study, capsys)
    rows = {r["run_id"]: r for r in read_csv(study / "results.csv")}
    solo = rows["solo-b4-r0"]
    assert (solo["role"], solo["world_size"], solo["batch_size_per_rank"]) == ("control", "1", "4")
    assert solo["speedup"] == solo["efficiency"] == solo["loss_batch_s"] == ""
    assert {rows[r]["role"] for r in ("n1-r0", "n2-r0")} == {"point"}
    assert "from 1 process to 2: speedup 0.62x" in out, "the baseline is n1, not the faster solo control"


def test_straggler_verdict_names_the_rank_and_the_phase(tmp_path, capsys):
    out = report_in_process(hand_study(tmp_path), capsys)
    line = next(x for x in out.splitlines() if "Straggler-bound" in x)
    assert "Straggler-bound at 2 processes" in line and "waiting for slower ranks is 8% of the time" in line
    assert "rank 1, which loses its time in optimizer (11.00 ms per step" in line


def test_null_communication_at_one_process_is_a_dash_and_out_of_the_medians(tmp_path, capsys):
    study = hand_study(tmp_path)
    report_in_process(study, capsys)
    rows = {r["run_id"]: r for r in read_csv(study / "results.csv")}
    assert rows["n1-r0"]["comm_s"] == rows["n1-r0"]["busbw_GBps"] == rows["n1-r0"]["overlap"] == ""
    scaling_table = (study / "report.md").read_text().split("## Scaling table")[1].split("\n## ")[0]
    one = next(x for x in scaling_table.splitlines() if x.startswith("| 1 | 8 | 8 |"))
    assert one.endswith("| 30% | – | – | compute |"), "hidden share and bus bandwidth: no value, no peer"


def test_without_controls_the_terms_that_need_them_are_empty_and_the_finding_says_why(tmp_path, capsys):
    study = hand_study(tmp_path, with_controls=False)
    out = report_in_process(study, capsys)
    two = {r["run_id"]: r for r in read_csv(study / "results.csv")}["n2-r0"]
    for term in ("batch", "contention", "data", "other", "interference"):
        assert two[f"loss_{term}_s"] == "", term
    assert float(two["loss_comm_exposed_s"]) == pytest.approx(0.040, abs=1e-12)
    assert float(two["loss_comm_wait_s"]) == pytest.approx(0.012, abs=1e-12)
    assert float(two["loss_unsplit_s"]) == pytest.approx(0.110 - 0.052, abs=1e-12)
    # 25 + 7.5 + 36.25 = 68.75: rounded to add up to 69.
    assert ("Of the 69 points of efficiency lost at 2 processes (efficiency 31%): 25 exposed all-reduce, "
            "8 waiting for rank 1, slow in optimizer, 36 not split (no solo control at per-rank batch 4 "
            "(study.controls=false); no no-communication control steps at 2 processes") in out
    table = (study / "report.md").read_text().split("## Why efficiency is lost")[1].split("\n## ")[0]
    assert "| + smaller batch | – |" in table and "| + not split (control missing) | 58.0 ms (+36." in table


def test_weak_waterfall_has_no_batch_term(tmp_path, capsys):
    """Weak scaling, per-rank batch 4: T(1) = 0.050 is the ideal (and the solo control); T(2) = 0.080.

    contention = C - T_ideal - d - o = 0.056 - 0.050 - 0.001 - 0.001 = 0.004; exposed 0.020 - 0.004 = 0.016;
    waiting 0.004; interference = 0.080 - 0.056 - 0.020 = 0.004: with d and o, 0.030 = T - T_ideal.
    """
    study = tmp_path / "weakhand"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"name": "weakhand", "kind": "weak", "nprocs": [1, 2],
                                                  "controls": True}))
    write_run(study, "n1-r0", 1, 4, 4, {"step_s": 0.050, "data_s": 0.002, "other_s": 0.001})
    write_run(study, "n2-r0", 2, 4, 8, {"step_s": 0.080, "data_s": 0.003, "other_s": 0.002, "comm_exposed_s": 0.020,
                                        "comm_wait_s": 0.004, "comm_bytes": 1e6, "comm_buckets": 1},
              controls={"steps": 5, "nocomm_step_s": 0.056, "per_rank_step_s": [0.056, 0.056]})
    report_in_process(study, capsys)
    two = {r["run_id"]: r for r in read_csv(study / "results.csv")}["n2-r0"]
    expected = {"batch": 0.0, "contention": 0.004, "data": 0.001, "other": 0.001, "interference": 0.004,
                "comm_exposed": 0.016, "comm_wait": 0.004}
    for term, seconds in expected.items():
        assert float(two[f"loss_{term}_s"]) == pytest.approx(seconds, abs=1e-12), term
    assert float(two["ideal_step_s"]) == 0.050


def test_at_1024_ranks_the_skew_sentence_names_the_ranks_most_often_last_and_stays_short():
    """The sentence listed every rank's count of last arrivals: 2,400 characters at 1,024 ranks."""
    lasts = [1] * 1024
    lasts[700], lasts[3] = 9, 5
    summary = {"waiting": {"ranks": [{"rank": r, "last": n} for r, n in enumerate(lasts)], "steps": 20}}
    clause = console.skew_clause(summary)
    assert clause.startswith("ranks take turns: last to arrive rank 700 in 9, rank 3 in 5, rank 0 in 1")
    assert "of 1024 ranks (every other rank in at most 1)" in clause and len(clause) < 200
    few = {"waiting": {"ranks": [{"rank": r, "last": n} for r, n in enumerate([0, 3, 1])], "steps": 4}}
    assert console.skew_clause(few) == "ranks take turns: last to arrive 0/3/1 of 4 steps by rank"
