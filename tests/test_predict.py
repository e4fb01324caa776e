"""scaling.predict: the bucket-pipeline model worked by hand, the predictor on records written here, the
timeline of a real job, and a held-out prediction on the emulated cluster (a reduced scripts/validate_predict.py)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from scaling.predict import events
from scaling.predict.events import Link, Period, busy_periods, fit_link, rebucket, simulate
from scaling.predict.model import Target, extrapolation_warning, predict
from scaling.predict.runs import find_points
from tests.jobs import NETNS_TOOL as TOOL, NO_WANDB, check, only_run_dir, run_command, torchrun

MiB = 1024 * 1024


# -- the event model, by hand ------------------------------------------------------------------------

def test_buckets_wait_for_the_previous_one_and_what_sticks_out_past_compute_is_exposed() -> None:
    # ready 0.1, 0.2, 0.3; costs 0.15, 0.05, 0.1: bucket 1 waits for bucket 0 (done 0.25), bucket 2
    # starts when ready (0.3 >= 0.3), backward compute ends at the last ready time, 0.3.
    p = simulate([0.1, 0.2, 0.3], [0.15, 0.05, 0.1])
    assert p.start_s == pytest.approx([0.1, 0.25, 0.3])
    assert p.done_s == pytest.approx([0.25, 0.3, 0.4])
    assert p.exposed_s == pytest.approx(0.1)
    assert p.busy_s == pytest.approx(0.3)


def test_communication_hidden_behind_the_rest_of_backward_is_not_exposed() -> None:
    p = simulate([0.1, 0.5], [0.1, 0.1], compute_end_s=1.0)
    assert p.exposed_s == 0.0
    assert p.end_s == 1.0
    assert p.busy_s == pytest.approx(0.2)


def test_ring_all_reduce_cost() -> None:
    # 2(n-1)·α + 2(n-1)/n·S/B at n=4, α=100 us, S=1 MB, B=1 MB/s: 6·1e-4 + 1.5 s.
    link = Link(1e-4, 1e6, "test")
    assert link.allreduce_s(1e6, 4) == pytest.approx(1.5006)
    assert link.allreduce_s(1e6, 1) == 0.0
    assert Link(1e-4, math.inf, "test").allreduce_s(1e6, 2) == pytest.approx(2e-4)


def test_fit_recovers_latency_and_bandwidth_from_busy_periods() -> None:
    alpha, bandwidth = 2e-4, 12.5e6
    periods = [Period(n, buckets, size, Link(alpha, bandwidth, "").allreduce_s(size, n) * buckets
                      if buckets == 1 else buckets * 2 * (n - 1) * alpha + 2 * (n - 1) / n * size / bandwidth)
               for n, buckets, size in [(2, 1, 1e5), (2, 2, 5e6), (4, 1, 2e5), (4, 3, 8e6)]]
    fitted_alpha, fitted_bandwidth = fit_link(periods)
    assert fitted_alpha == pytest.approx(alpha, rel=1e-6)
    assert fitted_bandwidth == pytest.approx(bandwidth, rel=1e-6)
    # One world size, one kind of period: α cannot be told apart, the bandwidth takes all of it.
    alone = fit_link([Period(2, 2, 5e6, 0.41)])
    assert alone == (0.0, pytest.approx(5e6 / 0.41))
    # α given: only B is fitted.
    assert fit_link([Period(2, 1, 1e6, 2 * 1e-3 + 1e6 / 1e6)], alpha_s=1e-3)[1] == pytest.approx(1e6)


def test_buckets_that_overlapped_are_priced_together() -> None:
    # Two buckets 2 ms apart that took 0.2 s each after the other: one busy period of 0.4 s.
    # (gloo ran them at once, sharing the link; the split between them is not their cost.)
    periods = busy_periods(2, [0.0005, 0.002], [0.207, 0.227], [1e6, 4e6])
    assert periods == [Period(2, 2, 5e6, pytest.approx(0.434))]
    # A bucket ready after the link went idle starts a period of its own.
    assert len(busy_periods(2, [0.0, 1.0], [0.1, 0.1], [1e6, 1e6])) == 2


def test_another_bucket_cap_splits_the_bytes_along_their_ready_times() -> None:
    # Measured: 1 MiB ready at 1 s, then 4 MiB ready at 2 s. With a 2 MiB cap: DDP's first bucket
    # of 1 MiB (ready 1 s), then 2 MiB (ready halfway through the second, 1.5 s), then 2 MiB (2 s).
    sizes, ready = rebucket([MiB, 4 * MiB], [1.0, 2.0], 2 * MiB)
    assert sizes == [MiB, 2 * MiB, 2 * MiB]
    assert ready == pytest.approx([1.0, 1.5, 2.0])
    assert events.FIRST_BUCKET_BYTES == MiB


# -- the predictor on records written here -----------------------------------------------------------

def write_run(folder: Path, world_size: int, batch: int, summary: dict, buckets: list[dict] | None = None,
              nocomm_step_s: float | None = None, kind: str = "weak", hook: str = "allreduce",
              cap: float = 25) -> Path:
    folder.mkdir(parents=True)
    run = {"status": "completed", "world_size": world_size, "nodes": world_size, "batch_size_per_rank": batch,
           "study_kind": kind, "comm_hook": hook, "bucket_cap_mb": cap, "instrumented": True, "summary": summary,
           "controls": {"nocomm_step_s": nocomm_step_s} if nocomm_step_s is not None else None}
    (folder / "run.json").write_text(json.dumps(run))
    if buckets is not None:
        (folder / "buckets.json").write_text(json.dumps({"buckets": buckets}))
    return folder


def step_summary(step_s: float, exposed_s: float, backward_s: float, data_s: float = 0.01,
                 optimizer_s: float = 0.02, other_s: float = 0.01) -> dict:
    forward_s = step_s - data_s - backward_s - optimizer_s - other_s
    return {"step_s": step_s, "data_s": data_s, "forward_s": forward_s, "backward_s": backward_s,
            "optimizer_s": optimizer_s, "other_s": other_s, "comm_exposed_s": exposed_s, "comm_sync_s": 0.0,
            "comm_wait_s": 0.0}


@pytest.fixture
def measured(tmp_path: Path) -> Path:
    """Two ranks on a 10 MB/s link, α = 0: buckets of 1 MB (ready 0.1 s) and 4 MB (ready 0.3 s).

    Ring at n=2 sends S per rank: 0.1 s and 0.4 s. Bucket 0: 0.1-0.2; bucket 1: 0.3-0.7. Backward
    compute ends at 0.3, so 0.4 s is exposed. No-comm step 0.5 s (forward 0.16, backward 0.3, data,
    optimizer, overhead 0.04), and 0.02 s of interference: step 0.92 s.
    """
    study = tmp_path / "study"
    buckets = [{"index": 0, "bytes": 1_000_000, "wire_bytes": 1_000_000, "ready_s": 0.1, "allreduce_s": 0.1},
               {"index": 1, "bytes": 4_000_000, "wire_bytes": 4_000_000, "ready_s": 0.3, "allreduce_s": 0.4}]
    write_run(study / "mlp-n2", 2, 8, step_summary(0.92, 0.4, 0.7), buckets, nocomm_step_s=0.5)
    write_run(study / "solo-b8-r0", 1, 8, step_summary(0.48, 0.0, 0.3))
    write_run(study / "solo-b4-r0", 1, 4, step_summary(0.30, 0.0, 0.18))
    return study


def test_the_measured_point_is_reproduced_and_other_world_sizes_follow_the_ring(measured: Path) -> None:
    points = find_points([measured])
    link = Link(0.0, 10e6, "test")
    at_2 = predict(points, Target(2, link))
    assert at_2.step_s == pytest.approx(0.92)
    assert at_2.comm_exposed_s == pytest.approx(0.4)
    assert at_2.interference_s == pytest.approx(0.02)
    assert at_2.bound == "compute"  # 0.5 s of compute against 0.4 s exposed
    # n=4: costs ×1.5 (0.15 s, 0.6 s): bucket 1 runs 0.3-0.9, exposed 0.6, step 0.5 + 0.02 + 0.6.
    at_4 = predict(points, Target(4, link))
    assert at_4.comm_exposed_s == pytest.approx(0.6)
    assert at_4.step_s == pytest.approx(1.12)
    assert at_4.comm_s == pytest.approx(0.75)
    assert at_4.bound == "communication"
    # fp16 halves the wire bytes: 0.3 s for the big bucket at n=4, exposed 0.3.
    assert predict(points, Target(4, link, hook="fp16")).comm_exposed_s == pytest.approx(0.3)
    # A faster link hides more: at 100 MB/s bucket 1 takes 0.06 s at n=4.
    assert predict(points, Target(4, Link(0.0, 100e6, "fast"))).comm_exposed_s == pytest.approx(0.06)


def test_strong_scaling_takes_compute_at_the_smaller_batch_from_the_solo_controls(measured: Path) -> None:
    points = find_points([measured])
    # Global batch 16 on 4 ranks: 4 per rank. Solo controls: forward+backward 0.44 s at batch 8,
    # 0.26 s at batch 4 (each less 0.04 s of data, optimizer, overhead): factor 0.26/0.44.
    p = predict(points, Target(4, Link(0.0, 10e6, "test"), global_batch=16))
    scale = 0.26 / 0.44
    assert p.batch_per_rank == 4
    assert "solo controls at batch 4 and 8" in p.compute_source
    assert p.nocomm_step_s == pytest.approx(0.04 + 0.46 * scale)
    # Ready at 0.1·scale and 0.3·scale; at n=4 bucket 0 takes 0.15 s, so bucket 1 (0.6 s) waits for it:
    # done at 0.1·scale + 0.75, backward compute ends at 0.3·scale.
    assert p.comm_exposed_s == pytest.approx(0.75 - 0.2 * scale)
    # Without a control at the target batch, forward and backward scale with the batch, and it says so.
    unmeasured = predict(points, Target(8, Link(0.0, 10e6, "test"), global_batch=16))
    assert unmeasured.compute_source.startswith("ASSUMED")
    assert unmeasured.nocomm_step_s == pytest.approx(0.04 + 0.46 * 2 / 8)


def test_command_writes_json_and_png_and_states_its_limits(measured: Path) -> None:
    proc = run_command([sys.executable, "-m", "scaling.predict", str(measured), "--nprocs", "2,4,32",
                           "--link", "80mbit,0us"], 120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((measured / "prediction.json").read_text())
    assert (measured / "prediction.png").stat().st_size > 10_000
    by_n = {p["world_size"]: p for p in record["predictions"]}
    assert by_n[4]["step_s"] == pytest.approx(1.12)  # 80 Mbit/s = 10 MB/s, as in the hand-worked case
    assert by_n[2]["efficiency"] == pytest.approx(1.0)
    assert by_n[4]["efficiency"] == pytest.approx(0.92 / 1.12)
    # At n=3 the big bucket takes 4/3 · 0.4 s: 0.53 s exposed against 0.5 s of compute.
    assert record["communication_bound_from_world_size"] == 3
    assert "the model assumes" in proc.stdout and "ring all-reduce" in proc.stdout
    assert "WARNING: world size 32 is more than 8x beyond the measured ones" in proc.stdout
    assert extrapolation_warning(find_points([measured]), 16) is None


def write_commbench(folder: Path, world_size: int, bandwidth_Bps: float, mtime: float) -> None:
    folder.mkdir(parents=True)
    record = {"world_size": world_size, "fit": [{"op": "all_reduce", "transport": "torch", "alpha_s": 0.0,
                                                 "bandwidth_GBps": bandwidth_Bps / 1e9, "rms_rel_error": 0.0}]}
    (folder / "commbench.json").write_text(json.dumps(record))
    os.utime(folder / "commbench.json", (mtime, mtime))


def test_commbench_at_each_world_size_prices_that_world_size(measured: Path, tmp_path: Path) -> None:
    # The link at 4 ranks is half as fast as the ring model carries over from 2 (a switch that saturates, or
    # emulated hosts sharing cores): only a benchmark at 4 ranks knows it. An older record at 2 ranks
    # (1 MB/s) is replaced by the newer one (10 MB/s, the link the runs were measured on).
    write_commbench(tmp_path / "cb" / "old-n2", 2, 1e6, 1_000_000)
    write_commbench(tmp_path / "cb" / "new-n2", 2, 10e6, 2_000_000)
    write_commbench(tmp_path / "cb4" / "run", 4, 5e6, 2_000_000)
    proc = run_command([sys.executable, "-m", "scaling.predict", str(measured), "--nprocs", "2,3,4,8",
                           "--commbench", str(tmp_path / "cb"), "--commbench", str(tmp_path / "cb4" / "run"),
                           "--out", str(tmp_path / "out")], 120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "out" / "prediction.json").read_text())
    by_n = {p["world_size"]: p for p in record["predictions"]}
    assert by_n[2]["step_s"] == pytest.approx(0.92)  # the 10 MB/s fit at 2 ranks reproduces the measured point
    # n=4 at 5 MB/s: bucket 0 takes 0.3 s (0.1-0.4), bucket 1 1.2 s (0.4-1.6): 1.3 s exposed, step 0.52 + 1.3 s
    # (the ring model from the 2-rank fit alone says 1.12 s).
    assert by_n[4]["comm_exposed_s"] == pytest.approx(1.3)
    assert by_n[4]["step_s"] == pytest.approx(1.82)
    assert "at 4 ranks" in by_n[4]["link"]
    # n=3 and n=8 are priced with the nearest measured world size, 4: at n=3 bucket 1 takes 4/3·4 MB / 5 MB/s
    # after bucket 0 (0.1-0.367); at n=8, 7/4·4 MB / 5 MB/s after bucket 0 (0.1-0.45).
    assert by_n[3]["comm_exposed_s"] == pytest.approx(0.1 + 4 / 3 * 5 / 5 - 0.3)
    assert by_n[8]["comm_exposed_s"] == pytest.approx(0.1 + 7 / 4 * 5 / 5 - 0.3)
    assert "no link measured at 8 processes: all-reduce priced with commbench fit at 4 ranks" in proc.stdout
    assert "two commbench records at 2 ranks: the newer one is used" in proc.stdout
    assert [f["world_size"] for f in record["link"]["by_world_size"]] == [2, 4]


def test_command_errors_name_the_problem(tmp_path: Path) -> None:
    proc = run_command([sys.executable, "-m", "scaling.predict", str(tmp_path), "--link", "fast"], 120)
    assert proc.returncode == 2
    assert "--link 'fast': rate 'fast'" in proc.stderr


# -- a real job's timeline ---------------------------------------------------------------------------

def test_a_real_job_records_its_bucket_timeline(tmp_path: Path) -> None:
    overrides = ["+exp=mlp", "model.in_features=512", "model.hidden=512", "model.layers=2", "dist.bucket_cap_mb=0.5",
                 "train.steps=12", "train.warmup_steps=2", "train.log_every=4", "instrument.flops=false",
                 "instrument.ops=false", "instrument.control_steps=2", NO_WANDB, f"paths.root={tmp_path}"]
    check(torchrun(2, overrides))
    run_dir = only_run_dir(tmp_path / "adhoc")
    run = json.loads((run_dir / "run.json").read_text())
    timeline = json.loads((run_dir / "buckets.json").read_text())["buckets"]
    # 512·512 + 512·512 + 512·10 weights and their biases, in fp32, all in the buckets.
    assert sum(b["bytes"] for b in timeline) == run["summary"]["comm_bytes"] == 4 * (2 * 512 * 513 + 10 * 513)
    assert len(timeline) >= 2
    assert [b["index"] for b in timeline] == list(range(len(timeline)))
    for b in timeline:
        assert 0 <= b["ready_s"] < run["summary"]["backward_s"]
        assert 0 <= b["allreduce_s"] <= b["allreduce_max_s"]
        assert b["wire_bytes"] == b["bytes"]
    assert sum(b["allreduce_s"] for b in timeline) > 0
    assert timeline[-1]["ready_s"] >= timeline[0]["ready_s"]  # the first layer's gradient is ready last

    # The study report with a prediction section: the measured point is reproduced by the model fitted on it.
    proc = run_command([sys.executable, "-m", "scaling.report", str(tmp_path / "adhoc"), "--predict", "2,4"], 120)
    assert proc.returncode == 0, proc.stderr
    # A section of the report like the others: after the tables, before the plots; its figure inside the page.
    md = (tmp_path / "adhoc" / "report.md").read_text()
    assert md.index("## Scaling table") < md.index("## Prediction") < md.index("## Plots"), md
    assert "![prediction](prediction.png)" in md and "step_s" in md.split("## Prediction")[1]
    page = (tmp_path / "adhoc" / "report.html").read_text()
    prediction_html = page.split("Prediction</h2>", 1)[1].split("<h2>", 1)[0]
    assert '<img alt="prediction" src="data:image/png;base64,' in prediction_html
    assert "written:" not in md and "written:" not in page and "written:" in proc.stdout
    record = json.loads((tmp_path / "adhoc" / "prediction.json").read_text())
    at_2 = next(p for p in record["predictions"] if p["world_size"] == 2)
    # How close the model comes on an unshaped link is a measurement (scripts/validate_predict.py: the gloo
    # all-reduce shares the cores with backward there, which a pipeline of buckets at the fitted bandwidth
    # does not see). What the record owns: the step is the no-communication step, the interference and the
    # exposed communication, summed; the split of the step adds up to it; the no-communication step at the
    # measured size and batch is the job's own control.
    assert at_2["step_s"] == pytest.approx(at_2["nocomm_step_s"] + at_2["interference_s"] + at_2["comm_exposed_s"],
                                           rel=1e-9)
    assert at_2["step_s"] == pytest.approx(at_2["compute_s"] + at_2["data_s"] + at_2["comm_exposed_s"]
                                           + at_2["other_s"], rel=1e-9)
    assert at_2["nocomm_step_s"] == pytest.approx(run["controls"]["nocomm_step_s"], rel=1e-9)
    assert at_2["comm_exposed_s"] >= at_2["comm_wait_s"] >= 0 and at_2["comm_s"] > 0
    assert at_2["samples_per_s"] == pytest.approx(at_2["global_batch"] / at_2["step_s"], rel=1e-9)


# -- held out, on the emulated cluster ---------------------------------------------------------------

CLUSTER_JOB = ["-m", "scaling.train", "+exp=mlp", "model.in_features=1024", "model.hidden=512", "model.layers=2",
               "dist.bucket_cap_mb=1", "train.steps=5", "train.warmup_steps=2", "train.log_every=5",
               "instrument.flops=false", "instrument.ops=false", "instrument.control_steps=2", NO_WANDB]


def cluster_run(root: Path, hosts: int, rate_mbit: int) -> Path:
    study = f"r{rate_mbit}-h{hosts}"
    proc = run_command([sys.executable, TOOL, "--hosts", str(hosts), "--rate", f"{rate_mbit}mbit", "--mtu", "9000",
                           "--torchrun", "--", *CLUSTER_JOB, f"paths.root={root}", f"study.name={study}"], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / study


@pytest.mark.netns
def test_fitted_at_one_rate_it_predicts_another_rate_and_host_count(tmp_path: Path) -> None:
    fit_dir = cluster_run(tmp_path, 2, 200)
    held_out = cluster_run(tmp_path, 3, 100)
    proc = run_command([sys.executable, "-m", "scaling.predict", str(fit_dir), "--nprocs", "3", "--link", "100mbit",
                           "--measured-link", "200mbit", "--out", str(tmp_path / "out")], 120)
    assert proc.returncode == 0, proc.stderr
    (predicted,) = json.loads((tmp_path / "out" / "prediction.json").read_text())["predictions"]
    (measured,) = find_points([held_out])
    print(json.dumps({"predicted": predicted["step_s"], "measured": measured.step_s,
                      "predicted_exposed": predicted["comm_exposed_s"], "measured_exposed":
                      measured.get("comm_exposed_s")}))
    assert predicted["step_s"] == pytest.approx(measured.step_s, rel=0.2)
    assert predicted["comm_exposed_s"] == pytest.approx(measured.get("comm_exposed_s"), rel=0.2)
