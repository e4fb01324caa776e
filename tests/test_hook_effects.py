"""What a communication hook or autocast does to the numbers, seen in real jobs.

The jobs run through ``tests.taps``, which writes, for one step, each gradient
bucket as a rank handed it to the hook and as the hook gave it back, and the
dtype of every Linear output. The expectations (rounding to the format, a rank-r
matrix, the bytes on the wire) come from the formats and the layer shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.jobs import TINY, check, load_run, only_run_dir, single, torchrun

FP32, BF16 = 4, 2
# (in, out) of each Linear of TINY["mlp"]: 64 -> 256 -> 256 -> 10 classes.
LAYERS = [(64, 256), (256, 256), (256, 10)]
BATCH = 4


@dataclass
class Grad:
    """One parameter's gradient at the tapped step: each rank's own, and what the hook returned on rank 0."""

    shape: tuple[int, ...]
    local: list[torch.Tensor]
    reduced: torch.Tensor
    reduced_elsewhere: torch.Tensor
    """The same on rank 1: every rank must end with the same gradient."""

    @property
    def exact_mean(self) -> torch.Tensor:
        return (self.local[0].double() + self.local[1].double()) / 2


@dataclass
class Tapped:
    grads: list[Grad]
    run: dict
    steps: list[dict]
    dtypes: dict
    run_dir: Path


def split(bucket: dict, key: str) -> list[torch.Tensor]:
    sizes = [int(torch.Size(shape).numel()) for shape in bucket["shapes"]]
    return [t.view(shape) for t, shape in zip(bucket[key].split(sizes), bucket["shapes"])]


def tapped_job(base: Path, overrides: list[str], step: int = 0) -> Tapped:
    """A 2-rank mlp job whose buckets of ``step`` are written out by tests.taps."""
    tap, root = base / "tap", base / "runs"
    proc = torchrun(2, [*TINY["mlp"], f"train.batch_size={BATCH}", "train.warmup_steps=1",
                        f"train.steps={max(step, 1)}", "train.log_every=1", "instrument.flops=false",
                        "instrument.control_steps=0", f"paths.root={root}", *overrides],
                    env={"SCALING_TEST_TAP_DIR": str(tap), "SCALING_TEST_TAP_STEP": str(step)}, module="tests.taps")
    check(proc)
    run_dir = only_run_dir(root / "adhoc")
    run, steps = load_run(run_dir)
    buckets = {r: sorted((torch.load(p) for p in tap.glob(f"rank{r}.bucket*.pt")), key=lambda b: b["index"])
               for r in (0, 1)}
    assert buckets[0] and len(buckets[0]) == len(buckets[1])
    grads = []
    for b0, b1 in zip(buckets[0], buckets[1]):
        assert b0["shapes"] == b1["shapes"]
        for shape, l0, l1, r0, r1 in zip(b0["shapes"], split(b0, "local"), split(b1, "local"), split(b0, "reduced"),
                                         split(b1, "reduced")):
            grads.append(Grad(tuple(shape), [l0, l1], r0, r1))
    assert sorted(g.shape for g in grads) == sorted(s for i, o in LAYERS for s in ((o, i), (o,)))
    return Tapped(grads, run, steps, json.loads((tap / "rank0.dtypes.json").read_text()), run_dir)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Tapped jobs by hook, each started once for the tests of this module."""
    made: dict[str, Tapped] = {}

    def get(hook: str) -> Tapped:
        if hook not in made:
            base = tmp_path_factory.mktemp(hook)
            if hook == "powersgd":
                # PowerSGD all-reduces plainly until start_powerSGD_iter (2): step 2 is its first compressed one.
                made[hook] = tapped_job(base, ["comm.hook=powersgd", f"comm.powersgd_rank={POWERSGD_RANK}"], step=2)
            else:
                made[hook] = tapped_job(base, [f"comm.hook={hook}"])
        return made[hook]

    return get


def representable(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype).float() == values


def test_plain_allreduce_returns_the_exact_mean(jobs):
    plain = jobs("allreduce")
    for g in plain.grads:
        assert torch.equal(g.reduced, g.reduced_elsewhere)
        torch.testing.assert_close(g.reduced.double(), g.exact_mean, rtol=1e-6, atol=1e-12)
    # fp32 averages are, for the most part, not fp16 numbers: the check below can tell them apart.
    everything = torch.cat([g.reduced.flatten() for g in plain.grads])
    assert representable(everything, torch.float16).float().mean() < 0.2


@pytest.mark.parametrize("hook,dtype,eps,smallest", [
    ("fp16", torch.float16, 2.0**-10, 2.0**-24),   # 10 mantissa bits; subnormal spacing 2^-24
    ("bf16", torch.bfloat16, 2.0**-7, 2.0**-133),  # 7 mantissa bits; fp32's exponent range
])
def test_half_precision_hooks_round_the_averaged_gradients(jobs, hook, dtype, eps, smallest):
    plain, half = jobs("allreduce"), jobs(hook)
    differ = total = 0
    for p, h in zip(plain.grads, half.grads):
        # Same seed, same data: both jobs handed the hooks the same gradients.
        assert p.shape == h.shape and all(torch.equal(a, b) for a, b in zip(p.local, h.local))
        assert torch.equal(h.reduced, h.reduced_elsewhere)
        # What came back went through the format: every value is one of its numbers.
        assert representable(h.reduced, dtype).all(), f"{hook}: {h.shape} holds values that are not {dtype}"
        # Rounded once per rank and once in the sum: within eps of the gradients' size.
        scale = (h.local[0].double().abs() + h.local[1].double().abs()) / 2
        error = (h.reduced.double() - h.exact_mean).abs()
        assert (error <= eps * scale + 2 * smallest).all(), f"{hook}: {h.shape} off by {(error / scale).max():.3g}"
        differ += int((h.reduced != p.reduced).sum())
        total += h.reduced.numel()
    print(f"{hook}: {differ} of {total} averaged gradient values differ from plain all-reduce's")
    assert differ > total / 2
    # Half the bytes cross the wire: two per gradient value.
    numel = sum(i * o + o for i, o in LAYERS)
    assert all(s["comm_bytes"] == numel * FP32 and s["comm_wire_bytes"] == numel * BF16 for s in half.steps)


POWERSGD_RANK = 2


def test_powersgd_returns_a_rank_r_projection_of_the_mean(jobs):
    job = jobs("powersgd")
    matrices = [g for g in job.grads if len(g.shape) == 2]
    assert len(matrices) == len(LAYERS)
    for g in matrices:
        mean = g.exact_mean
        approx = g.reduced.double()
        assert torch.equal(g.reduced, g.reduced_elsewhere)
        full = torch.linalg.svdvals(mean)
        sv = torch.linalg.svdvals(approx)
        print(f"powersgd {g.shape}: singular values of the mean {full[:4].tolist()}, returned {sv[:4].tolist()}")
        assert full[POWERSGD_RANK] > 1e-2 * full[0]  # the gradient itself is not low-rank ...
        assert sv[POWERSGD_RANK] < 1e-5 * sv[0]  # ... what the hook returns is, of rank r ...
        assert sv[POWERSGD_RANK - 1] > 1e-3 * sv[0]  # ... and not of a lower rank
        # P Q^T with Q = M^T P and P orthonormal: the mean projected onto r directions.
        u = torch.linalg.svd(approx).U[:, :POWERSGD_RANK]
        assert torch.linalg.norm(u @ (u.T @ mean) - approx) < 1e-4 * torch.linalg.norm(approx)
    for g in job.grads:
        if len(g.shape) == 1:  # vectors are not compressed: all-reduced as they are
            torch.testing.assert_close(g.reduced.double(), g.exact_mean, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("hook", ["fp16", "bf16", "powersgd"])
def test_compressing_hooks_are_timed_by_what_they_send(jobs, hook):
    """Bandwidth is what went over the wire per second: fp16/bf16 send 2 of each gradient's 4 bytes (PowerSGD's
    factors: the test below), and each rank's algbw is those bytes over its own transfer time."""
    job = jobs(hook)
    model = sum(i * o + o for i, o in LAYERS) * FP32
    assert job.run["comm_hook"] == hook
    for s in job.steps:
        assert s["comm_s"] > 0 and s["comm_bytes"] == model
        if hook != "powersgd":
            assert s["comm_wire_bytes"] == model // 2
    rank_steps = [json.loads(line) for line in (job.run_dir / "logs/rank0.steps.jsonl").read_text().splitlines()]
    for s in rank_steps:
        assert s["algbw_GBps"] == pytest.approx(s["comm_wire_bytes"] / (s["comm_s"] - s["comm_sync_s"]) / 1e9,
                                                rel=1e-6)


def test_powersgd_sends_the_low_rank_factors(jobs):
    job = jobs("powersgd")
    by_step = {s["step"]: s for s in job.steps}
    numel = sum(i * o + o for i, o in LAYERS)
    # Per weight matrix (out x in): P (out x r) and Q (in x r); biases as they are. PowerSGD
    # compresses a matrix only when that is at least 2x smaller, true of all three here.
    assert all(2 * (i + o) * POWERSGD_RANK < i * o for i, o in LAYERS)
    factors = sum((i + o) * POWERSGD_RANK + o for i, o in LAYERS)
    assert by_step[1]["comm_wire_bytes"] == numel * FP32  # before start_powerSGD_iter: plain all-reduce
    assert by_step[2]["comm_wire_bytes"] == factors * FP32
    print(f"powersgd wire bytes: plain {numel * FP32}, compressed {by_step[2]['comm_wire_bytes']} "
          f"(expected {factors * FP32})")


def test_bf16_autocast_computes_activations_in_bf16(jobs, tmp_path):
    tap, root = tmp_path / "tap", tmp_path / "runs"
    proc = single([*TINY["mlp"], f"train.batch_size={BATCH}", "train.steps=2", "train.warmup_steps=1",
                   "train.log_every=2", "train.amp=bf16", f"paths.root={root}"],
                  env={"SCALING_TEST_TAP_DIR": str(tap)}, module="tests.taps")
    check(proc)
    dtypes = json.loads((tap / "rank0.dtypes.json").read_text())
    assert set(dtypes["Linear"]) == {"torch.bfloat16"}
    assert set(jobs("allreduce").dtypes["Linear"]) == {"torch.float32"}  # the same model without autocast
    memory = load_run(only_run_dir(root / "adhoc"))[0]["memory"]["max"]
    # Autograd saves the bf16 copy of a weight that autocast made for the matmul where it needs
    # it for the gradient of the layer's input: every layer but the first (the data needs none).
    # Biases are not saved at all.
    assert memory["autocast_weights"] == sum(i * o for i, o in LAYERS[1:]) * BF16
    # Each Linear's input is saved in bf16; the loss runs in fp32 (autocast's rule for
    # log-softmax): its output, the int64 targets and a scalar weight.
    saved_inputs = BATCH * sum(i for i, _ in LAYERS) * BF16
    loss = BATCH * LAYERS[-1][1] * FP32 + BATCH * 8 + FP32
    print(f"bf16 activations: expected {saved_inputs + loss}, measured {memory['activations']}")
    assert memory["activations"] == pytest.approx(saved_inputs + loss, rel=0.05)
