"""Real multi-process training jobs: the records hold every key of docs/contract.md, and the numbers add up."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from scaling import cli, config
from scaling.records import schema
from scaling.train.plan import prepare
from tests.jobs import QUICK, TINY, check, load_run, only_run_dir, single, torchrun

COMM_KEYS = [*schema.COMM_KEYS, *schema.CROSS_RANK_KEYS]
STEP_KEYS = [*schema.PHASE_KEYS, *COMM_KEYS]
SUMMARY_KEYS = STEP_KEYS + ["step_s_p05", "step_s_p95", "samples_per_s", *schema.SHARE_FRACS, "comm_wait_frac",
                            "bound", "straggler"]
MEMORY_KEYS = list(schema.MEMORY_KEYS)
RUN_KEYS = ["status", "world_size", "nodes", "backend", "launcher", "device", "provenance", "summary", "memory",
            "flops", "batch_size_per_rank", "global_batch_size", "run_id", "controls"]


two_rank_dirs: dict = {}


def model_bytes(overrides: list[str]) -> int:
    job = prepare(config.parse(cli.compose_config(overrides)))
    return sum(p.numel() * p.element_size() for p in job.model.parameters())


@pytest.fixture(scope="module", params=sorted(TINY))
def two_rank_run(request, tmp_path_factory):
    exp = request.param
    root = tmp_path_factory.mktemp(exp) / "runs"
    overrides = [*TINY[exp], "train.steps=5", "train.warmup_steps=2", "train.log_every=2", f"paths.root={root}"]
    proc = torchrun(2, overrides, env={"GLOO_SOCKET_IFNAME": "lo", "GLOO_SECRET_KEY": "hunter2"})
    check(proc)
    run_dir = only_run_dir(root / "adhoc")
    run, steps = load_run(run_dir)
    two_rank_dirs[run["run_id"]] = run_dir
    return exp, overrides, run_dir, run, steps, proc


def test_run_json_has_every_spec_key(two_rank_run):
    exp, _, run_dir, run, _, _ = two_rank_run
    assert not [k for k in RUN_KEYS if k not in run]
    assert run["status"] == "completed"
    assert (run["world_size"], run["nodes"], run["backend"], run["launcher"]) == (2, 1, "gloo", "torchrun")
    assert not [k for k in SUMMARY_KEYS if k not in run["summary"]]
    assert not [k for k in MEMORY_KEYS if k not in run["memory"]["max"]]
    assert len(run["memory"]["per_rank"]) == 2
    assert run["flops"]["per_sample"] > 0 and 0 < run["flops"]["mfu"] < 1.5
    assert run["flops"]["achieved_per_s"] == pytest.approx(
        run["flops"]["per_sample"] * run["batch_size_per_rank"] / run["summary"]["step_s"])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["exp_name"] == exp
    assert {"rank0.log", "rank1.log"} <= {p.name for p in (run_dir / "logs").iterdir()}


def test_provenance_keeps_relevant_variables_and_no_secret(two_rank_run):
    _, _, run_dir, run, _, _ = two_rank_run
    env = run["provenance"]["env"]
    assert env.get("GLOO_SOCKET_IFNAME") == "lo"
    assert env.get("OMP_NUM_THREADS") == "1"
    assert "hunter2" not in (run_dir / "run.json").read_text()
    assert run["provenance"]["torch"].startswith("2.")


def test_one_line_per_measured_step_with_rank_statistics(two_rank_run):
    _, _, _, run, steps, _ = two_rank_run
    assert [s["step"] for s in steps] == [2, 3, 4, 5, 6]
    for s in steps:
        for key in STEP_KEYS:
            assert s[f"{key}_min"] <= s[key] + 1e-12 <= s[f"{key}_max"] + 2e-12
        assert s["slowest_rank"] in (0, 1)
        assert s["samples_per_s"] == pytest.approx(run["global_batch_size"] / s["step_s_max"])


def test_parts_add_up_to_the_step(two_rank_run):
    _, _, run_dir, _, steps, _ = two_rank_run
    per_rank = [json.loads(line) for r in (0, 1) for line in (run_dir / f"logs/rank{r}.steps.jsonl").read_text().splitlines()]
    for s in steps + per_rank:
        parts = s["data_s"] + s["forward_s"] + s["backward_s"] + s["optimizer_s"] + s["other_s"]
        assert parts == pytest.approx(s["step_s"], rel=1e-9, abs=1e-9)
        assert min(s["data_s"], s["forward_s"], s["backward_s"], s["optimizer_s"], s["other_s"]) >= 0
        assert s["compute_s"] == pytest.approx(s["step_s"] - s["data_s"] - s["comm_exposed_s"] - s["other_s"], abs=1e-9)
        assert 0 <= s["comm_exposed_s"] <= s["comm_s"] + 1e-12
        # DDP waits for every bucket inside backward(), so its communication lies
        # within it; the buffer broadcast happens before forward.
        assert s["comm_sync_s"] <= s["forward_s"] + 1e-9
        assert s["comm_exposed_s"] <= s["backward_s"] + s["comm_sync_s"] + 1e-9
    for s in per_rank:
        assert s["comm_wire_bytes"] == s["comm_bytes"]  # plain all-reduce sends the bucket as it is
        assert s["algbw_GBps"] == pytest.approx(s["comm_wire_bytes"] / (s["comm_s"] - s["comm_sync_s"]) / 1e9)
        assert s["busbw_GBps"] == pytest.approx(s["algbw_GBps"] * 2 * (2 - 1) / 2)
        assert s["overlap"] == pytest.approx(1 - s["comm_exposed_s"] / s["comm_s"])


def test_comm_and_memory_bytes_match_the_model(two_rank_run):
    _, overrides, _, run, steps, _ = two_rank_run
    expected = model_bytes(overrides)
    assert all(s["comm_bytes"] == expected for s in steps)
    for rank in run["memory"]["per_rank"]:
        assert rank["params"] == rank["grads"] == rank["comm_buffers"] == expected
        assert rank["activations"] > 0
        assert rank["rss_peak"] > rank["peak"] > 0
    # SGD keeps one momentum buffer per parameter (none without momentum), AdamW
    # two moments (plus a scalar step each).
    optim = run_config(run)["optim"]
    moments = 2 if optim["name"] == "adamw" else int(optim["momentum"] > 0)
    assert expected * moments <= run["memory"]["max"]["optimizer_state"] <= expected * moments * 1.01


def run_config(run):
    return yaml.safe_load((two_rank_dirs[run["run_id"]] / "config.yaml").read_text())


def test_shares_are_shares_of_the_total_time(two_rank_run):
    _, _, _, run, steps, _ = two_rank_run
    s = run["summary"]
    total = sum(step["step_s"] for step in steps)
    for part in ("compute", "comm_exposed", "comm_wait", "data", "other"):
        assert s[f"{part}_frac"] == pytest.approx(sum(step[f"{part}_s"] for step in steps) / total)
    assert sum(s[f"{k}_frac"] for k in ("compute", "comm_exposed", "data", "other")) == pytest.approx(1.0)
    assert 0 <= s["comm_wait_frac"] <= s["comm_exposed_frac"]


def test_control_steps_are_recorded_apart(two_rank_run):
    _, _, run_dir, run, steps, _ = two_rank_run
    controls = run["controls"]
    assert controls["steps"] == 5 and len(controls["per_rank_step_s"]) == 2
    assert controls["nocomm_step_s"] > 0
    # Left out of every other record: the measured steps are exactly 2..6.
    assert [s["step"] for s in steps] == [2, 3, 4, 5, 6]
    ranks = [json.loads(line)["step"] for line in (run_dir / "logs/rank0.steps.jsonl").read_text().splitlines()]
    assert ranks == [2, 3, 4, 5, 6]


def test_console_shows_progress_and_the_table(two_rank_run):
    _, _, _, run, _, proc = two_rank_run
    out = proc.stdout
    assert "step     2/5" in out and "samples/s" in out
    for text in ("where the time goes", "exposed communication", "memory per rank", "FLOPs per sample", "MFU",
                 "without any communication (control steps)",
                 f"{run['summary']['bound'].capitalize()}-bound on 2 processes"):
        assert text in out, text
    assert out.count("where the time goes") == 1  # rank 0 alone prints


def test_single_process_from_another_directory(tmp_path):
    proc = single([*TINY["mlp"], *QUICK, "paths.root=runs", "study.name=solo"], cwd=tmp_path)
    check(proc)
    run, steps = load_run(only_run_dir(tmp_path / "runs" / "solo"))
    assert (run["launcher"], run["world_size"], run["status"]) == ("single", 1, "completed")
    assert len(steps) == 4
    # No peer: no DDP, and no communication numbers at all (null, not 0).
    for key in COMM_KEYS:
        assert run["summary"][key] is None and all(s[key] is None for s in steps), key
    assert run["summary"]["comm_exposed_frac"] == 0.0 and run["summary"]["comm_wait_frac"] is None
    assert run["memory"]["max"]["comm_buffers"] is None
    assert run["summary"]["compute_frac"] + run["summary"]["data_frac"] + run["summary"]["other_frac"] == pytest.approx(1)
    assert "no peer, no communication" in proc.stdout


def test_instrumentation_off_keeps_only_the_wall_clock(root):
    proc = torchrun(2, [*TINY["mlp"], *QUICK, "instrument.enabled=false", f"paths.root={root}"])
    check(proc)
    run, steps = load_run(only_run_dir(root / "adhoc"))
    assert run["instrumented"] is False and run["status"] == "completed"
    assert len(steps) == 4 and "comm_s" not in steps[0] and steps[0]["step_s"] > 0
    assert "bound" not in run["summary"] and run["summary"]["samples_per_s"] > 0
    assert run["memory"]["max"]["activations"] is None and run["memory"]["max"]["params"] > 0


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    """The same 3-process job instrumented (the framework's timed hook, the loss scaled by 1/N) and bare
    (DDP's own reducer, which divides): 3 ranks, so that the ring factor 2(n-1)/n is not 1."""
    out = {}
    for instrumented in ("true", "false"):
        root = tmp_path_factory.mktemp(f"three-{instrumented}")
        check(torchrun(3, [*TINY["mlp"], "train.steps=6", "train.warmup_steps=1", "train.log_every=3",
                           "instrument.flops=false", "instrument.ops=false", "instrument.control_steps=0",
                           f"instrument.enabled={instrumented}", f"paths.root={root}"]))
        out[instrumented] = load_run(only_run_dir(root / "adhoc"))
    return out


def test_instrumented_and_bare_jobs_train_the_same_weights(three_ranks):
    """Same data, same seeds: the same loss after every update, whether the mean's 1/N is folded into the
    loss or divided out of the sum (at N = 3 the two round differently, in the last bits only). With the
    1/N left out the instrumented job ends elsewhere."""
    losses = {k: run["final_loss"] for k, (run, _) in three_ranks.items()}
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5, abs=0), losses


def test_bus_bandwidth_carries_the_ring_factor_of_three_ranks(three_ranks):
    """nccl-tests' bus bandwidth of an all-reduce is its algorithm bandwidth times 2(n-1)/n: 4/3 at n = 3
    (at n = 2 the factor is 1, and a busbw that dropped it would pass unseen)."""
    run, steps = three_ranks["true"]
    assert run["world_size"] == 3 and len(steps) == 6
    for record in steps:
        assert record["busbw_GBps"] == pytest.approx(record["algbw_GBps"] * 4 / 3, rel=1e-9), record
    assert run["summary"]["busbw_GBps"] == pytest.approx(run["summary"]["algbw_GBps"] * 4 / 3, rel=1e-9)


def test_imagefolder_data(tmp_path):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for label in ("cat", "dog", "eel"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    proc = single(["+exp=resnet", "data=imagefolder", f"data.root={tmp_path / 'images'}", "data.image_size=16",
                   "train.batch_size=4", *QUICK, f"paths.root={tmp_path / 'runs'}"])
    check(proc)
    run, steps = load_run(only_run_dir(tmp_path / "runs" / "adhoc"))
    assert run["status"] == "completed" and len(steps) == 4
    cfg = yaml.safe_load((only_run_dir(tmp_path / "runs" / "adhoc") / "config.yaml").read_text())
    assert cfg["data"]["root"] == str(tmp_path / "images")
    # 3 classes found in the folder: the head has 3 outputs.
    assert run["memory"]["max"]["params"] == model_bytes(["+exp=resnet", "data.num_classes=3"])


def test_bf16_autocast_runs(root):
    proc = single([*TINY["mlp"], *QUICK, "train.amp=bf16", f"paths.root={root}"])
    check(proc)
    run, _ = load_run(only_run_dir(root / "adhoc"))
    assert run["amp"] == "bf16" and run["status"] == "completed"
    assert math.isfinite(run["summary"]["step_s"])
