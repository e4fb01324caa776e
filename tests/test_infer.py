"""python -m scaling.infer on real runs: the recorded samples, the throughput curve, the server search and its live
replay, replicas, failures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.jobs import TINY, check, end_tree, job_env, single, start, wakeup_lateness_s
from scaling.infer import server_scenario
from scaling.infer.config import P99_MIN_QUERIES

SWEEP = ["infer.batch_sizes=[1,8,64]", "infer.queries=30", "infer.warmup_queries=3", "data.num_samples=64"]
STALL_S = 0.005
"""A known service time: every forward sleeps this long (SCALING_INJECT_STALL=forward:...)."""
STALLED = {"SCALING_INJECT_STALL": f"forward:{STALL_S}"}
SLEEP_SLACK_S = 0.001
"""How late a 5 ms sleep (and a forward of the tiny model) may end at the median on an idle host; each check
adds twice the host's wake-up lateness measured just before it (``wakeup_lateness_s``)."""
SERVED_STEP = 0.5
"""The served run's rates are 50% apart: the answer below the capacity (1.5**-0.5 = 0.82 of it) and the next rate
up over it (1.22). Live, the service times drift a few % from the searched ones on busy cores (up to +4% over
eight runs here, the answer's live p99 then 36 ms against a simulated 24 ms at 0.88 of capacity, a 30% step):
at 0.82 of capacity the simulated p99 stays under the budget for a service 10% slower, and the next rate up
overloads the server for one 10% faster."""
# A 40 ms budget is eight forwards: the answer's p99 (about 25 ms, five forwards) has room for a busy machine's
# stalls; each live rate runs 100 budgets, 4 s.
SERVED = ["infer.batch_sizes=[1,4]", "infer.queries=100", "infer.warmup_queries=3", "infer.scenario=server",
          "infer.latency_budget_ms=40", "infer.server_timeout_ms=2", f"infer.server_search_step={SERVED_STEP}",
          "infer.ops=false", "data.num_samples=64"]


def service_times(record: dict) -> server_scenario.ServiceTimes:
    """What the search simulated on: replica 0's service times in the serving loop and the generator's lags."""
    served = [p for p in record["per_replica"][0]["batches"] if "server_service_s" in p]
    return server_scenario.ServiceTimes({p["batch_size"]: p["server_service_s"] for p in served},
                                [lag for p in served for lag in p["server_issue_lag_s"]])


def infer_record(root: Path) -> tuple[Path, dict]:
    [run_dir] = [p for p in (root / "infer").iterdir() if p.is_dir()]
    return run_dir, json.loads((run_dir / "infer.json").read_text())


@pytest.fixture(scope="module")
def slack_s() -> float:
    """SLEEP_SLACK_S and twice how late this host wakes a sleeping thread now."""
    return SLEEP_SLACK_S + 2 * wakeup_lateness_s()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("infer") / "runs"
    proc = single([*TINY["mlp"], *SWEEP, "infer.server_replay=false", f"paths.root={root}"], module="scaling.infer")
    check(proc)
    return infer_record(root)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, dict]:
    """The server scenario with a 2 ms service time injected into every forward, its answer replayed live."""
    root = tmp_path_factory.mktemp("served") / "runs"
    proc = single([*TINY["mlp"], *SERVED, f"paths.root={root}"], env=STALLED, module="scaling.infer")
    check(proc)
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
    for point in record["batches"]:
        offline = point["offline"]
        assert point["samples_per_s_from"] == "offline" and offline["queries"] == 30
        assert point["samples_per_s"] == offline["samples_per_s"] == pytest.approx(
            point["batch_size"] * offline["queries"] / offline["total_s"])


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
    for line in record["findings"]:  # no parenthesis opens inside another
        depth = np.cumsum([{"(": 1, ")": -1}.get(c, 0) for c in line])
        assert depth.max() <= 1 and depth[-1] == 0, line


@pytest.fixture(scope="module")
def offline_failed(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, dict]:
    """Offline alone, batch 2 and then a batch that no memory holds: 2**45 indices of 8 bytes are more than
    any address space, so the allocation fails at once."""
    root = tmp_path_factory.mktemp("offline") / "runs"
    proc = single([*TINY["mlp"], f"infer.batch_sizes=[2,{2 ** 45}]", "infer.queries=10", "infer.scenario=offline",
                   "infer.ops=false", "data.num_samples=64", f"paths.root={root}"], env=STALLED, module="scaling.infer")
    return (proc, *infer_record(root))


def test_offline_alone_records_its_throughput_and_no_latency(offline_failed):
    _, _, record = offline_failed
    [point] = record["per_replica"][0]["batches"]
    assert point["latency_s"] is None and point["queries"] is None and "latency_samples_s" not in point
    # Ten batches of 2 back to back, each at least the injected sleep: at most 2 samples per sleep.
    assert point["offline"]["queries"] == 10 and point["offline"]["total_s"] >= 10 * STALL_S
    assert 0.5 * 2 / STALL_S < point["samples_per_s"] <= 2 / STALL_S
    assert point["samples_per_s_from"] == "offline"
    assert record["findings"][0].startswith("batch 2: ") and "samples/s offline" in record["findings"][0]
    assert "p90" not in record["findings"][0] and "server" not in record


def test_a_batch_too_large_for_memory_fails_the_run_and_keeps_the_sizes_before_it(offline_failed):
    proc, run_dir, record = offline_failed
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert record["status"] == "failed"
    assert record["error"].startswith("rank 0 failed: RuntimeError: ") and "allocate" in record["error"]
    assert record["finished_batch_sizes"] == [2] and record["batches"][0]["offline"]["queries"] == 10
    assert f"scaling.infer: run failed: {record['error']}" in proc.stderr
    assert json.loads((run_dir / "logs" / "rank0.error.json").read_text())["root_cause"] is True


def test_the_service_time_is_the_injected_one(served, slack_s):
    _, record = served
    for point in record["per_replica"][0]["batches"]:  # the injected sleep plus a forward of a tiny model
        assert STALL_S <= point["latency_s"]["p50"] <= STALL_S + slack_s, point["latency_s"]
        # The same size served back to back by the serving loop: the sleep and the loop's own costs.
        assert len(point["server_service_s"]) == len(point["server_issue_lag_s"]) == 100
        assert STALL_S <= np.median(point["server_service_s"]) <= STALL_S + slack_s
    assert "server_service_s" not in record["batches"][0]  # the node's batches hold summaries only


def test_server_search_is_consistent_on_its_own_service_times(served):
    _, record = served
    found = record["server"]
    assert found["queries"] >= P99_MIN_QUERIES and found["step"] == SERVED_STEP
    service = service_times(record)
    budget = record["latency_budget_ms"] / 1e3
    replay = lambda rate: server_scenario.trial(service, rate, found["queries"], found["max_batch"],  # noqa: E731
                                        found["timeout_ms"] / 1e3, found["seed"], budget)
    answer, above = replay(found["rate_qps"]), replay(found["next_rate_qps"])
    assert answer.p99_s == pytest.approx(found["p99_s"]) and answer.p99_s <= budget
    assert above.p99_s == pytest.approx(found["next_p99_s"]) and above.p99_s > budget
    # Rates on the grid around the capacity: the capacity mid-way between two of them, the answer and the next
    # rate up one step apart.
    assert found["capacity_qps"] == pytest.approx(service.capacity_qps(found["max_batch"]))
    k = np.log(found["rate_qps"] / found["capacity_qps"]) / np.log(1 + SERVED_STEP) + 0.5
    assert k == pytest.approx(round(k), abs=1e-9)
    assert found["capacity_share"] == pytest.approx(found["rate_qps"] / found["capacity_qps"])
    assert found["next_rate_qps"] == pytest.approx(found["rate_qps"] * (1 + SERVED_STEP))


def test_server_answer_meets_the_budget_live_and_the_next_rate_up_does_not(served, slack_s):
    """The issue's sentence on a real job: the capacity is four queries per injected 5 ms forward, the search's
    answer below it meets the 40 ms p99 live and the next rate up, above it, does not."""
    _, record = served
    found, budget = record["server"], record["latency_budget_ms"] / 1e3
    # The capacity the grid is anchored at is the injected service time's: 4 queries per forward of 5 ms and a bit.
    assert 4 / (STALL_S + slack_s) <= found["capacity_qps"] <= 4 / STALL_S
    answer, above = found["replay"]["answer"], found["replay"]["next"]
    assert answer["p99_s"] <= budget, answer
    assert above["p99_s"] > budget, above
    assert answer["budget_met"] and not above["budget_met"] and found["replay"]["agrees"]
    # Live, the answer's service times are the ones searched on (the injected sleep), not a slower server.
    assert STALL_S <= answer["service_s"]["4"]["p50"] <= STALL_S + slack_s


def test_server_answer_and_next_rate_served_live(served):
    run_dir, record = served
    found, budget = record["server"], record["latency_budget_ms"] / 1e3
    service = service_times(record)
    live = found["replay"]
    for name, rate in (("answer", found["rate_qps"]), ("next", found["next_rate_qps"])):
        trial = live[name]
        assert trial["rate_qps"] == rate
        assert trial["queries"] == server_scenario.queries_at(rate, found["queries"], budget) >= P99_MIN_QUERIES
        assert trial["duration_s"] >= 0.9 * trial["queries"] / rate  # issued in real time, not all at once
        assert trial["budget_met"] == (trial["p99_s"] <= budget)
        # Every query waits for at least one forward and its injected sleep.
        assert trial["p99_s"] >= trial["p50_s"] >= STALL_S
        # The same arrivals through the same batcher: the batches the search simulated. A server that sent
        # each query alone would show 1; one that waited for full batches, 4.
        simulated = server_scenario.trial(service, rate, found["queries"], found["max_batch"], found["timeout_ms"] / 1e3,
                                  found["seed"], budget)
        assert trial["mean_batch"] == pytest.approx(simulated.mean_batch, rel=0.15), (name, trial, simulated)
    assert live["agrees"] == (live["answer"]["budget_met"] and not live["next"]["budget_met"])
    line = next(f for f in record["findings"] if f.startswith("served live: "))
    assert ("the replay agrees with the search" in line) == live["agrees"]
    from scaling.report.__main__ import main as report_main

    assert report_main([str(run_dir)]) == 0
    markdown = (run_dir / "report.md").read_text()
    assert record["findings"][0] in markdown and "| 4 | 100 |" in markdown
    assert f"| answer | {found['rate_qps']:,.1f} |" in markdown
    assert f"Live replay {'agrees' if live['agrees'] else 'disagrees'} with the search." in markdown


def test_a_lone_slow_sample_does_not_set_the_answer():
    """Service times of 5 ms: one 40 ms sample in 100 (a preemption seen once) leaves the answer where it was;
    three in 100 (3% of batches at 40 ms) leave no rate within a 25 ms p99."""
    steady = [0.005 + 1e-5 * (i % 7) for i in range(100)]
    found = {}
    for slow in (0, 1, 3):
        samples = [0.04] * slow + steady[slow:]
        service = server_scenario.ServiceTimes({1: samples, 4: samples})
        found[slow] = server_scenario.search(service, 0.025, 1000, 4, 0.002, seed=0, step=0.1)["rate_qps"]
    assert found[0] is not None and found[1] == found[0]
    assert found[3] is None


def test_live_server_recovers_known_service_times_and_time_outs():
    """The live batcher on the real model with a 2 ms sleep in every forward: lone queries wait the time-out and
    one forward, full batches one forward, and past capacity the device never idles while queries wait."""
    import torch

    from scaling.infer import live
    from scaling.infer.measure import Server
    from scaling.train.faults import Injector, Stall

    class TimedServer(Server):
        """Each forward's start and end, taken here, apart from the batcher's own clock."""

        spans: list[tuple[float, float]] = []

        def forward(self, x, *args, **kwargs):
            start = time.perf_counter()
            out = super().forward(x, *args, **kwargs)
            self.spans.append((start, time.perf_counter()))
            return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job runs; idle intra-op threads spinning on 2 busy cores cost milliseconds
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        server = TimedServer(model, torch.randn(8, 64), torch.device("cpu"), None,
                             Injector(0, [Stall("forward", 0.002)]))
        server.latencies(server.batch(4), 5)
        late_s = wakeup_lateness_s()
        slack_s, abs_s = SLEEP_SLACK_S + 2 * late_s, 0.0005 + 2 * late_s
        forward_s = float(np.median(server.latencies(server.batch(4), 40)))  # one query at a time
        assert 0.002 <= forward_s <= 0.002 + slack_s, (forward_s, late_s)
        timeout_s = 0.001
        # The server's part of a latency starts when the generator issues the query (a busy machine wakes the
        # generator late: that lag is reported apart).
        # One query every 6 ms: each is alone, waits the time-out, then one forward.
        run = live.serve(server, [1, 4], np.arange(60) * 0.006, 4, timeout_s)
        assert run.batches.count(1) >= 0.9 * len(run.batches)
        assert np.median(run.latency_s - run.issue_lag_s) == pytest.approx(timeout_s + forward_s, abs=abs_s)
        # A lone query's service time runs from its time-out to its completion: one forward.
        assert np.median(run.service_s) == pytest.approx(forward_s, abs=abs_s)
        # Four at once every 8 ms, with a 5 ms time-out: the batch is full at once, one forward and no waiting.
        run = live.serve(server, [1, 4], np.repeat(np.arange(30) * 0.008, 4), 4, 0.005)
        assert run.batches.count(4) >= 0.9 * len(run.batches)
        assert np.median(run.latency_s - run.issue_lag_s) == pytest.approx(forward_s, abs=abs_s)
        # Three times what 4 queries per forward serve: full batches, back to back until the backlog is gone.
        server.spans.clear()
        arrive = server_scenario.arrivals(600, 3 * 4 / forward_s, seed=0)
        run = live.serve(server, [1, 4], arrive, 4, timeout_s)
        assert np.mean(run.batches) > 3.8 and len(server.spans) == len(run.batches) and set(run.padded) <= {1, 4}
        first, last = server.spans[0][0], server.spans[-1][1]
        busy = sum(end - start for start, end in server.spans)
        assert busy >= 0.95 * (last - first), (busy, last - first)  # the device never waits for the batcher
        assert run.latency_s[-1] >= 0.5 * (len(run.batches) * 0.002 - arrive[-1])  # it waited for the backlog
        # Back to back, a batch's service time is its forward (timed apart, above) plus what the loop adds
        # between forwards: at least the forward, and at the median a fraction of a millisecond more.
        spans = np.array([end - start for start, end in server.spans])
        assert np.all(run.service_s[1:] >= spans[1:] - 1e-6)
        assert 0 <= np.median(run.service_s[1:] - spans[1:]) <= abs_s
    finally:
        torch.set_num_threads(threads)


def test_two_replicas_started_without_a_launcher(tmp_path):
    """infer.replicas=2 with no launcher starts itself under torchrun; each replica serves its own rate live."""
    root = tmp_path / "runs"
    proc = single([*TINY["mlp"], "infer.batch_sizes=[1,4]", "infer.queries=20", "infer.replicas=2",
                   "infer.latency_budget_ms=10", "infer.server_timeout_ms=1", "infer.ops=false",
                   "data.num_samples=64", f"paths.root={root}"], env={"SCALING_INJECT_STALL": "forward:0.002"},
                  module="scaling.infer")
    check(proc)
    _, record = infer_record(root)
    assert record["replicas"] == 2 and [r["rank"] for r in record["per_replica"]] == [0, 1]
    for point, one, two in zip(record["batches"], *(r["batches"] for r in record["per_replica"])):
        assert point["queries"] == one["queries"] + two["queries"] == 40
        assert point["samples_per_s"] == pytest.approx(one["samples_per_s"] + two["samples_per_s"])
        assert point["offline"]["samples_per_s"] == pytest.approx(
            one["offline"]["samples_per_s"] + two["offline"]["samples_per_s"])
        assert point["latency_s"]["p50"] == pytest.approx(np.percentile(one["latency_samples_s"]
                                                                        + two["latency_samples_s"], 50))
    server = record["server"]
    assert len(server["replicas_rate_qps"]) == 2 and len(server["replicas_replay_agrees"]) == 2
    assert server["node_rate_qps"] == pytest.approx(sum(server["replicas_rate_qps"]))
    assert "2 replicas serve" in record["findings"][-1]


def test_replicas_must_match_the_processes_launched(tmp_path):
    from tests.jobs import torchrun

    root = tmp_path / "runs"
    proc = torchrun(2, [*TINY["mlp"], "infer.replicas=3", f"paths.root={root}"], module="scaling.infer")
    assert proc.returncode != 0
    assert "scaling.infer: error: infer.replicas=3 but 2 processes were launched" in proc.stderr
    assert not root.exists()


def test_a_bad_input_is_one_line_and_creates_nothing(tmp_path):
    root = tmp_path / "runs"
    proc = single([*TINY["mlp"], "infer.batch_sizes=[1,0]", f"paths.root={root}"], module="scaling.infer")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("scaling.infer: error: infer.batch_sizes must be a non-empty list of integers "
                                   ">= 1 (got [1, 0])")
    assert not root.exists()


@pytest.mark.parametrize("override, message", [
    ("infer.scenario=batch", "infer.scenario must be one of single_stream|offline|server|all (got 'batch')"),
    ("infer.latency_budget_ms=0", "infer.latency_budget_ms must be a number > 0 (got 0)"),
    ("infer.latency_budget_ms=-3", "infer.latency_budget_ms must be a number > 0 (got -3)"),
    ("infer.server_queries=100", "infer.server_queries must be an integer >= 662 (got 100)"),
    ("infer.server_replay=sometimes", "infer.server_replay must be true or false (got 'sometimes')"),
    ("infer.server_search_step=0", "infer.server_search_step must be a number > 0 (got 0)"),
])
def test_bad_inputs_in_process(tmp_path, capsys, override, message):
    """The same command line, composed and checked in this process (the checks run before anything starts)."""
    from scaling import cli
    from scaling.infer.job import main

    root = tmp_path / "runs"
    assert cli.run("scaling.infer", main, config_name="infer",
                   argv=[*TINY["mlp"], override, f"paths.root={root}"]) == 2
    assert capsys.readouterr().err.strip() == f"scaling.infer: error: {message}"
    assert not root.exists()


def test_sigterm_leaves_infer_json_failed_with_what_finished(tmp_path, slack_s):
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "scaling.infer", *TINY["mlp"], "infer.batch_sizes=[1,2,4]", "infer.queries=100",
           "infer.scenario=single_stream", "infer.ops=false", "data.num_samples=64", f"paths.root={root}"]
    proc = start(cmd, env=job_env(STALLED))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = list(root.glob("infer/*/logs/rank0.batches.jsonl"))
            if done and done[0].read_text().count("\n") >= 1:  # batch 1 finished; batch 2 takes 0.5 s or more
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        end_tree(proc)
    assert proc.returncode == 143, stderr[-3000:]
    _, record = infer_record(root)
    assert record["status"] == "failed"
    assert record["error"] == "rank 0: Terminated: stopped by SIGTERM: the launcher or scheduler ended the job"
    assert record["finished_batch_sizes"] == [1]
    [point] = record["batches"]
    assert point["queries"] == 100 and STALL_S <= point["latency_s"]["p50"] <= STALL_S + slack_s
    assert record["findings"][0].startswith("batch 1: ")
