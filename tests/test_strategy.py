"""dist.strategy=ddp|zero1|fsdp on real 2-process torchrun jobs: model state per rank against the formulas,
collective bytes against what each strategy must send, the same loss as DDP, per-kind times that add up, and
a stalled rank recovered as waiting in the collective where its peer waited for it."""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scaling.records import schema
from tests.jobs import STRATEGY_MLP as JOB, STRATEGY_SHAPE, check, load_run, only_run_dir, single, torchrun

# Four 256x256 linear layers and a 256->5 head: every tensor splits evenly over 2 ranks except the head,
# whose 5 rows FSDP pads to 6 (3 per rank).
HIDDEN, LAYERS, CLASSES = STRATEGY_SHAPE
BLOCK = HIDDEN * HIDDEN + HIDDEN  # elements of one hidden layer (weight and bias)
HEAD = HIDDEN * CLASSES + CLASSES
PSI = LAYERS * BLOCK + HEAD  # 264,453 parameters
HEAD_PADDED = 6 * HIDDEN + 6  # the head gathered on 2 ranks: dim 0 padded to a multiple of 2
FP32 = 4
STALL_S = 0.2

# zero1: rank 1 stalls in its optimizer step, so rank 0 waits in ZeRO's broadcast; fsdp without resharding:
# rank 1 stalls before forward, so rank 0 waits in the first all-gather. Neither changes the arithmetic.
# Every run measures 8 steps (the same updates, so the same final loss): with 2 ranks, fewer steps all won by
# rank 1 could be chance at the straggler test's level (scaling.records.waiting), and no rank would be named.
STEPS = 8
RUNS = {"ddp": (["dist.strategy=ddp", f"train.steps={STEPS}"], None),
        "zero1": (["dist.strategy=zero1", f"train.steps={STEPS}"], f"optimizer:{STALL_S}@rank=1"),
        "fsdp": (["dist.strategy=fsdp", f"train.steps={STEPS}"], None),
        "fsdp_keep": (["dist.strategy=fsdp", "dist.fsdp.reshard_after_forward=false", f"train.steps={STEPS}"],
                      f"forward:{STALL_S}@rank=1")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, list[dict], Path]]:
    root = tmp_path_factory.mktemp("strategies") / "runs"

    def launch(name: str):
        overrides, stall = RUNS[name] if name in RUNS else (["dist.strategy=fsdp"], None)
        args = [*JOB, *overrides, f"paths.root={root}", f"study.name={name}"]
        env = {"SCALING_INJECT_STALL": stall} if stall else None
        return single(args) if name == "solo" else torchrun(2, args, env=env)

    # Two jobs at a time: their start-up (imports, rendezvous) is most of their time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip([*RUNS, "solo"], pool.map(launch, [*RUNS, "solo"])))
    out = {}
    for name, proc in procs.items():
        check(proc)
        run_dir = only_run_dir(root / name)
        out[name] = (*load_run(run_dir), run_dir)
    return out


def rank_steps(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / f"rank{rank}.steps.jsonl").read_text().splitlines()]


def test_model_state_per_rank_is_what_the_formulas_say(runs) -> None:
    # AdamW in fp32: 4 bytes of parameter, 4 of gradient, 8 of state (exp_avg, exp_avg_sq) per parameter.
    textbook = {"ddp": 16 * PSI, "zero1": 4 * PSI + 4 * PSI + 8 * PSI / 2, "fsdp": 16 * PSI / 2, "fsdp_keep": 16 * PSI / 2}
    for name, expected in textbook.items():
        run, _, _ = runs[name]
        assert run["strategy_effective"] == name.removesuffix("_keep")
        for rank, (measured, predicted) in enumerate(zip(run["memory"]["per_rank"], run["memory_model"]["per_rank"])):
            state = measured["params"] + measured["grads"] + measured["optimizer_state"]
            assert measured["model_state"] == state
            assert state == pytest.approx(expected, rel=0.05), (name, rank, measured)
            assert state == pytest.approx(predicted["model_state"], rel=0.05), (name, rank, measured, predicted)
        assert run["memory_model"]["textbook_model_state"] == pytest.approx(expected, rel=1e-6)
    # What FSDP saves: half of DDP's model state on 2 ranks; ZeRO-1 a quarter.
    ddp = runs["ddp"][0]["memory"]["max"]["model_state"]
    assert runs["fsdp"][0]["memory"]["max"]["model_state"] / ddp == pytest.approx(0.5, abs=0.01)
    assert runs["zero1"][0]["memory"]["max"]["model_state"] / ddp == pytest.approx(0.75, abs=0.01)


def test_fsdp_holds_gathered_parameters_as_resharding_says(runs) -> None:
    # Resharding after forward: backward holds the block it differentiates and prefetches the one before it.
    two_blocks = 2 * BLOCK * FP32
    every_block = (LAYERS * BLOCK + HEAD_PADDED) * FP32
    for name, gathered in (("fsdp", two_blocks), ("fsdp_keep", every_block)):
        run = runs[name][0]
        assert [r["params_unsharded"] for r in run["memory"]["per_rank"]] == [gathered, gathered], name
        assert run["memory_model"]["max"]["params_unsharded"] == gathered
        assert run["memory"]["max"]["comm_buffers"] >= BLOCK * FP32  # a block's flat all-gather output at least
    assert runs["ddp"][0]["memory"]["max"]["params_unsharded"] is None


def test_collective_bytes_are_what_each_strategy_must_send(runs) -> None:
    grads = PSI * FP32
    gathered = (LAYERS * BLOCK + HEAD_PADDED) * FP32  # FSDP moves the padded tensors
    expected = {
        "ddp": {"allreduce": grads},
        "zero1": {"allreduce": grads, "broadcast": grads},  # every parameter once, from the rank that owns it
        "fsdp": {"allgather_fwd": gathered, "allgather_bwd": gathered, "reducescatter": gathered},
        "fsdp_keep": {"allgather_fwd": gathered, "allgather_bwd": 0, "reducescatter": gathered},
    }
    for name, kinds in expected.items():
        _, steps, _ = runs[name]
        strategy = name.removesuffix("_keep")
        assert set(schema.STRATEGY_KINDS[strategy]) == set(kinds)
        assert len(steps) == STEPS
        for step in steps:
            for kind, nbytes in kinds.items():
                assert step[f"comm_{kind}_bytes_min"] == step[f"comm_{kind}_bytes_max"] == nbytes, (name, kind, step)
            assert step["comm_wire_bytes"] == sum(kinds.values())
    # FSDP moves 1.5x DDP's bytes when it gathers again in backward (the textbook's 3 ψ against 2 ψ on a ring).
    assert sum(expected["fsdp"].values()) / (2 * grads) == pytest.approx(1.5, rel=0.01)


def test_same_loss_as_ddp_after_the_same_steps(runs) -> None:
    ddp = runs["ddp"][0]["final_loss"]
    for name in ("zero1", "fsdp", "fsdp_keep"):
        assert runs[name][0]["final_loss"] == pytest.approx(ddp, rel=1e-5, abs=1e-6), name


def test_per_kind_times_are_parts_of_the_communication_totals(runs) -> None:
    for name in RUNS:
        _, _, run_dir = runs[name]
        kinds = schema.STRATEGY_KINDS[name.removesuffix("_keep")]
        for rank in (0, 1):
            for step in rank_steps(run_dir, rank):
                for kind in kinds:
                    busy, exposed = step[f"comm_{kind}_s"], step[f"comm_{kind}_exposed_s"]
                    assert 0 <= exposed <= busy + 1e-9, (name, rank, kind, step)
                assert step["comm_s"] == pytest.approx(
                    step["comm_sync_s"] + sum(step[f"comm_{k}_s"] for k in kinds), abs=1e-9)
                assert step["comm_exposed_s"] == pytest.approx(
                    step["comm_sync_s"] + sum(step[f"comm_{k}_exposed_s"] for k in kinds), abs=1e-9)


def test_a_stalled_rank_is_waited_for_in_the_collective_that_follows_the_stall(runs) -> None:
    """Rank 1 sleeps 200 ms per step: in its optimizer step (zero1) or before forward (fsdp). Rank 0 spends it
    waiting in ZeRO's broadcast / FSDP's first all-gather: exposed there, counted as waiting, rank 1 named."""
    for name, kind, phase in (("zero1", "broadcast", "optimizer"), ("fsdp_keep", "allgather_fwd", "forward")):
        run, steps, run_dir = runs[name]
        waiting = statistics.median(s[f"comm_{kind}_exposed_s"] for s in rank_steps(run_dir, 0))
        stalled = statistics.median(s[f"comm_{kind}_exposed_s"] for s in rank_steps(run_dir, 1))
        assert waiting - stalled == pytest.approx(STALL_S, rel=0.25), (name, waiting, stalled)
        assert statistics.median(s["comm_wait_s_max"] for s in steps) == pytest.approx(STALL_S, rel=0.25), name
        straggler = run["summary"]["straggler"]
        assert (straggler["rank"], straggler["phase"]) == (1, phase), (name, straggler)
        assert straggler["lost_s"] == pytest.approx(STALL_S, rel=0.3), (name, straggler)


def test_world_size_one_trains_unwrapped_and_says_so(runs) -> None:
    run, steps, _ = runs["solo"]
    assert (run["world_size"], run["strategy"], run["strategy_effective"]) == (1, "fsdp", "none")
    assert "no effect" in run["strategy_note"]
    assert all(s["comm_s"] is None for s in steps)
    assert run["memory"]["max"]["model_state"] == pytest.approx(16 * PSI, rel=0.05)
