"""python -m scaling.infer on real runs: the recorded samples, the throughput curve, the server search, replicas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, check_ok, single, torchrun
from scaling.infer import server as serving
from scaling.infer.config import P99_MIN_QUERIES

SWEEP = ["infer.batch_sizes=[1,8,64]", "infer.queries=30", "infer.warmup_queries=3", "data.num_samples=64"]


def infer_record(root: Path) -> tuple[Path, dict]:
    [run_dir] = [p for p in (root / "infer").iterdir() if p.is_dir()]
    return run_dir, json.loads((run_dir / "infer.json").read_text())


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("infer") / "runs"
    proc = single([*TINY["mlp"], *SWEEP, f"paths.root={root}"], module="scaling.infer")
    check_ok(proc)
    return infer_record(root)


def test_percentiles_are_those_of_the_recorded_samples(mlp):
    _, record = mlp
    for point in record["per_replica"][0]["batches"]:
        samples = point["latency_samples_s"]
        assert len(samples) == point["queries"] == 30
        for p in (50, 90, 99):
            assert point["latency_s"][f"p{p}"] == pytest.approx(np.percentile(samples, p))
        assert point["latency_s"]["max"] == max(samples)
    assert [p["latency_s"] for p in record["batches"]] == [p["latency_s"] for p in record["per_replica"][0]["batches"]]


def test_a_large_batch_serves_more_samples_per_second(mlp):
    _, record = mlp
    rate = {p["batch_size"]: p["samples_per_s"] for p in record["batches"]}
    assert rate[64] > 3 * rate[1], rate  # per-query overheads are shared by 64 samples


def test_memory_and_bounds_per_batch_size(mlp):
    run_dir, record = mlp
    points = {p["batch_size"]: p for p in record["batches"]}
    assert points[1]["memory"]["weights"] == 4 * (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)
    assert points[64]["memory"]["activations"] > 16 * points[1]["memory"]["activations"] > 0
    for point in points.values():
        assert point["compute_bound"] in ("memory", "arithmetic")
        assert 0 < point["memory_frac"] + point["arithmetic_frac"] <= 1.0  # the rest: views and transposes
    # Batch 1 reads every weight for one sample; at 64 the matrix products reuse each weight 64 times.
    assert points[1]["compute_bound"] == "memory"
    assert points[64]["arithmetic_frac"] > points[1]["arithmetic_frac"]
    assert (run_dir / "latency_throughput.png").stat().st_size > 10_000
    assert record["findings"][0].startswith("batch 1: ")
    assert "within 15 ms p99" in record["findings"][0]


def test_server_answer_meets_the_budget_and_the_next_rate_does_not(mlp):
    _, record = mlp
    found = record["server"]
    assert found["queries"] >= P99_MIN_QUERIES
    service = serving.ServiceTimes({p["batch_size"]: p["latency_samples_s"] for p in record["per_replica"][0]["batches"]})
    budget = record["latency_budget_ms"] / 1e3
    replay = lambda rate: serving.trial(service, rate, found["queries"], found["max_batch"],  # noqa: E731
                                        found["timeout_ms"] / 1e3, found["seed"], budget)
    answer, above = replay(found["rate_qps"]), replay(found["next_rate_qps"])
    assert answer.p99_s == pytest.approx(found["p99_s"]) and answer.p99_s <= budget
    assert above.p99_s > budget
    assert found["next_rate_qps"] <= found["rate_qps"] * (1 + serving.SEARCH_STEP) * 1.0001


def test_server_with_a_budget_below_one_query_finds_no_rate():
    service = serving.ServiceTimes({1: [0.010] * 5, 4: [0.020] * 5})
    found = serving.search(service, budget_s=0.005, queries=P99_MIN_QUERIES, max_batch=4, timeout_s=0.001, seed=0)
    assert found["rate_qps"] is None and found["next_p99_s"] > 0.005


def test_two_replicas_under_torchrun(tmp_path):
    root = tmp_path / "runs"
    proc = torchrun(2, [*TINY["mlp"], "infer.batch_sizes=[1,8]", "infer.queries=20", "infer.replicas=2",
                        "infer.ops=false", "infer.scenario=single_stream", "data.num_samples=64",
                        f"paths.root={root}"], module="scaling.infer")
    check_ok(proc)
    _, record = infer_record(root)
    assert record["replicas"] == 2 and [r["rank"] for r in record["per_replica"]] == [0, 1]
    for point, one, two in zip(record["batches"], *(r["batches"] for r in record["per_replica"])):
        assert point["queries"] == one["queries"] + two["queries"] == 40
        assert point["samples_per_s"] == pytest.approx(one["samples_per_s"] + two["samples_per_s"])
        assert point["latency_s"]["p50"] == pytest.approx(np.percentile(one["latency_samples_s"]
                                                                        + two["latency_samples_s"], 50))
    assert "server" not in record
    assert "2 replicas serve" in record["findings"][-1]


@pytest.mark.parametrize("override, message", [
    ("infer.batch_sizes=[1,0]", "infer.batch_sizes must be a non-empty list of integers >= 1 (got [1, 0])"),
    ("infer.scenario=batch", "infer.scenario must be one of single_stream|offline|server|all (got 'batch')"),
    ("infer.latency_budget_ms=0", "infer.latency_budget_ms must be a number > 0 (got 0)"),
    ("infer.latency_budget_ms=-3", "infer.latency_budget_ms must be a number > 0 (got -3)"),
    ("infer.server_queries=100", "infer.server_queries must be an integer >= 662 (got 100)"),
])
def test_bad_inputs_are_one_line_and_create_nothing(tmp_path, override, message):
    root = tmp_path / "runs"
    proc = single([*TINY["mlp"], override, f"paths.root={root}"], module="scaling.infer")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"scaling.infer: error: {message}"
    assert not root.exists()


def test_report_renders_an_inference_folder(mlp):
    from scaling.report.__main__ import main as report_main

    run_dir, record = mlp
    assert report_main([str(run_dir.parent)]) == 0
    markdown = (run_dir.parent / "report.md").read_text()
    assert record["findings"][0] in markdown
    assert "| 64 | 30 |" in markdown


def test_replicas_without_a_launcher_start_themselves_under_torchrun(tmp_path):
    root = tmp_path / "runs"
    proc = single([*TINY["mlp"], "infer.batch_sizes=[2]", "infer.queries=10", "infer.replicas=2", "infer.ops=false",
                   "infer.scenario=offline", "data.num_samples=64", f"paths.root={root}"], module="scaling.infer")
    check_ok(proc)
    _, record = infer_record(root)
    assert record["replicas"] == 2 and len(record["per_replica"]) == 2
    assert record["batches"][0]["offline_samples_per_s"] == pytest.approx(
        sum(r["batches"][0]["offline_samples_per_s"] for r in record["per_replica"]))


def test_replicas_must_match_the_processes_launched(tmp_path):
    root = tmp_path / "runs"
    proc = torchrun(2, [*TINY["mlp"], "infer.replicas=3", f"paths.root={root}"], module="scaling.infer")
    assert proc.returncode != 0
    assert "scaling.infer: error: infer.replicas=3 but 2 processes were launched" in proc.stderr
    assert not root.exists()
