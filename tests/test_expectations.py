"""The numbers of real jobs against values worked out here, independently of the code that measures them.

Each expectation comes from the model's shapes, a published figure or the
optimizer's rules, never from scaling's own formulas; each tolerance is tight
enough that a number 20 % off fails.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.jobs import NO_WANDB, TINY, check, load_run, only_run_dir, single

MLP = {"in_features": 64, "hidden": 256, "layers": 2, "num_classes": 10}  # TINY["mlp"]; 10 classes from the data
MLP_BATCH = 4
FP32 = 4
INT64 = 8


def mlp_layers() -> list[tuple[int, int]]:
    """(in, out) of each Linear of the mlp experiment: in -> hidden (x layers) -> classes."""
    widths = [MLP["in_features"]] + [MLP["hidden"]] * MLP["layers"] + [MLP["num_classes"]]
    return list(zip(widths[:-1], widths[1:]))


def mlp_parameters() -> list[int]:
    """numel of each parameter tensor: a weight (out x in) and a bias (out) per Linear."""
    return [n for fan_in, fan_out in mlp_layers() for n in (fan_in * fan_out, fan_out)]


def mlp_job(root, *extra: str) -> dict:
    """One process, as ``python -m scaling.train`` runs it: 2 warm-up + 2 measured steps."""
    proc = single([*TINY["mlp"], f"train.batch_size={MLP_BATCH}", "train.steps=2", "train.warmup_steps=1",
                   "train.log_every=2", f"paths.root={root}", *extra])
    check(proc)
    return load_run(only_run_dir(root / "adhoc"))[0]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> dict:
    """The mlp experiment's own optimizer (SGD without momentum), FLOPs and memory measured."""
    return mlp_job(tmp_path_factory.mktemp("plain") / "runs")


# -- FLOPs ----------------------------------------------------------------------------------------

def test_mlp_flops_per_sample_from_its_layer_shapes(plain_run):
    # A Linear of in x out costs 2*in*out FLOPs per sample forward (a multiply and an add per
    # weight); backward the same again for the weight gradient and again for the gradient of
    # its input, which the first layer does not need (the data needs no gradient).
    layers = mlp_layers()
    forward = sum(2 * i * o for i, o in layers)
    weight_grads = forward
    input_grads = sum(2 * i * o for i, o in layers[1:])
    expected = forward + weight_grads + input_grads
    measured = plain_run["flops"]["per_sample"]
    print(f"mlp FLOPs per sample: expected {expected}, measured {measured:.0f}")
    assert measured == pytest.approx(expected, rel=0.05)


RESNET18_MACS_224 = 1.814e9
"""Multiply-accumulates of one ResNet-18 forward at 224x224 with 1000 classes: torchvision's figure
(``ResNet18_Weights.IMAGENET1K_V1.meta["_ops"]``, given there as "GFLOPS" but counted as MACs)."""
RESNET18_PARAMS_1000 = 11_689_512
"""Parameters of ResNet-18 with 1000 classes (torchvision's ``num_params``)."""
RESNET_FEATURES = 512  # width of the final pooled features, the input of the FC layer


def test_resnet18_flops_per_sample_from_the_published_count(tmp_path):
    classes, image = 10, 32
    proc = single(["+exp=resnet", f"data.image_size={image}", f"data.num_classes={classes}", "train.batch_size=2",
                   "data.num_samples=16", "train.steps=1", "train.warmup_steps=1", "train.log_every=1",
                   "instrument.control_steps=0", NO_WANDB, f"paths.root={tmp_path}"])
    check(proc)
    run = load_run(only_run_dir(tmp_path / "adhoc"))[0]
    # 224 -> 112 (conv1) -> 56 (max-pool) -> 56, 28, 14, 7; at 32: 16 -> 8 -> 8, 4, 2, 1. Every
    # conv feature map is 1/7 of the 224 one per side, so conv MACs scale by 1/49. The FC layer
    # (512 x classes) does not scale with the image.
    conv_macs = (RESNET18_MACS_224 - RESNET_FEATURES * 1000) / (224 / image) ** 2
    forward_macs = conv_macs + RESNET_FEATURES * classes
    # Backward: a weight gradient and an input gradient per layer, each as costly as the
    # forward, except conv1's input gradient (the image needs none): 7x7x3 kernel, 64 maps of 16x16.
    conv1_macs = (image // 2) ** 2 * 64 * 7 * 7 * 3
    expected = 2 * (3 * forward_macs - conv1_macs)
    measured = run["flops"]["per_sample"]
    print(f"resnet18 at {image}x{image} FLOPs per sample: expected {expected:.6g}, measured {measured:.6g}")
    assert measured == pytest.approx(expected, rel=0.05)
    params = RESNET18_PARAMS_1000 - (RESNET_FEATURES + 1) * 1000 + (RESNET_FEATURES + 1) * classes
    assert run["memory"]["max"]["params"] == params * FP32


# -- memory -----------------------------------------------------------------------------------------

def test_mlp_activations_are_the_tensors_autograd_must_save(plain_run):
    # Each Linear saves its input (for its weight gradient); each ReLU saves its output, which
    # is the next Linear's input: the same tensor, held once. Cross-entropy saves the
    # log-softmax output, the int64 targets and a scalar total weight.
    b, c = MLP_BATCH, MLP["num_classes"]
    saved_inputs = b * (MLP["in_features"] + MLP["layers"] * MLP["hidden"]) * FP32
    loss = b * c * FP32 + b * INT64 + FP32
    expected = saved_inputs + loss
    measured = plain_run["memory"]["max"]["activations"]
    print(f"mlp activations: expected {expected} B, measured {measured} B")
    assert measured == pytest.approx(expected, rel=0.05)
    assert plain_run["memory"]["max"]["autocast_weights"] == 0  # fp32: no low-precision weight copies


def test_params_and_grads_are_four_bytes_per_parameter(plain_run):
    expected = sum(mlp_parameters()) * FP32
    memory = plain_run["memory"]["max"]
    print(f"mlp params/grads: expected {expected} B, measured {memory['params']} / {memory['grads']} B")
    assert memory["params"] == expected
    assert memory["grads"] == expected


def test_optimizer_state_follows_the_optimizer(plain_run, tmp_path):
    params = sum(mlp_parameters()) * FP32
    # SGD without momentum keeps nothing between steps.
    assert plain_run["memory"]["max"]["optimizer_state"] == 0
    # With momentum, one buffer the size of each parameter.
    momentum = mlp_job(tmp_path / "momentum", "optim.momentum=0.9")["memory"]["max"]["optimizer_state"]
    # AdamW: two moments per parameter, and a float32 step count per parameter tensor.
    adamw = mlp_job(tmp_path / "adamw", "optim=adamw")["memory"]["max"]["optimizer_state"]
    expected_adamw = 2 * params + len(mlp_parameters()) * FP32
    print(f"optimizer state: momentum expected {params} measured {momentum}; "
          f"adamw expected {expected_adamw} measured {adamw}")
    assert momentum == params
    assert adamw == expected_adamw


def test_one_process_has_no_communication_to_report(plain_run):
    summary = plain_run["summary"]
    for key in ("comm_s", "comm_exposed_s", "comm_wait_s", "overlap", "comm_bytes", "algbw_GBps", "busbw_GBps"):
        assert summary[key] is None, key
    assert plain_run["memory"]["max"]["comm_buffers"] is None


# -- the peak FLOP/s probe ----------------------------------------------------------------------------

def mm_flops_per_s(size: int, seconds: float) -> float:
    """Best FLOP/s of 3 back-to-back torch.mm of size x size (2*size^3 FLOPs each) over ``seconds``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        best = max(best, 3 * 2 * size**3 / (time.perf_counter() - start))
    return best


def test_gemm_probe_agrees_with_a_timing_of_torch_mm():
    from scaling.instruments.flops import gemm_probe_flops

    size = 1024  # the probe's size on a CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ratios = []
        for _ in range(3):  # side by side, so that a load that comes and goes hits both alike
            probe = gemm_probe_flops(torch.device("cpu"), torch.float32, size=size, seconds=0.3)
            timed = mm_flops_per_s(size, 0.3)
            ratios.append(probe / timed)
            print(f"GEMM {size}: probe {probe / 1e9:.1f} GFLOP/s, torch.mm timed here {timed / 1e9:.1f} GFLOP/s")
    finally:
        torch.set_num_threads(threads)
    assert sorted(ratios)[1] == pytest.approx(1.0, rel=0.25)


def test_the_probe_cache_is_the_sessions_own(plain_run, own_cache):
    cache = json.loads((own_cache / "scaling" / "peak_flops.json").read_text())
    assert plain_run["flops"]["peak_source"] == "probe"
    # This session's figure (its last digit may differ: the run's copy went through its own arithmetic).
    assert any(plain_run["flops"]["peak_per_s"] == pytest.approx(v, rel=1e-12) for v in cache.values()), cache


# -- the transformer ------------------------------------------------------------------------------

LM = {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128, "vocab_size": 256, "seq_len": 16}  # TINY["transformer"]
LM_BATCH = 4


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lm")
    check(single([*TINY["transformer"], f"train.batch_size={LM_BATCH}", "train.steps=2", "train.warmup_steps=1",
                  "train.log_every=2", "instrument.ops=false", "instrument.control_steps=0", f"paths.root={root}"]))
    return load_run(only_run_dir(root / "adhoc"))[0]


def test_transformer_flops_per_sample_from_its_shapes(lm_run):
    """Per token and block: the qkv, output and two feed-forward projections, 2 FLOPs per weight
    (2(3d² + d² + 2·d·d_ff)); the tied head 2·d·V; attention's two products QKᵀ and AV, 2·s·d each per
    token over the full s×s square (the counter does not halve it for the causal mask). Backward costs
    twice the forward throughout: every layer needs its input gradient (the embeddings train)."""
    d, layers, ff, vocab, seq = (LM[k] for k in ("d_model", "n_layers", "d_ff", "vocab_size", "seq_len"))
    forward = seq * (layers * 2 * (4 * d * d + 2 * d * ff) + 2 * d * vocab) + layers * 2 * 2 * seq * seq * d
    expected = 3 * forward
    measured = lm_run["flops"]["per_sample"]
    print(f"transformer FLOPs per sample: expected {expected}, measured {measured:.0f}")
    assert measured == pytest.approx(expected, rel=0.01)


def test_transformer_activations_are_the_tensors_autograd_must_save(lm_run):
    """Counted tensor by tensor, each storage once, parameters never (the head's weight is the embedding's).

    Per block, over N = batch × seq tokens: each LayerNorm its input and a mean and 1/std per token; the
    qkv projection its (normalised) input; attention q, k and v (views of the qkv output: one 3d-wide
    tensor), its output and a log-sum-exp per head and token; the output projection its input, which is
    attention's output itself (the CPU kernel lays it out so that the head merge is a view); the first
    feed-forward layer its input, GELU its input, the second layer GELU's output. Then the final norm and
    the head's input; the token and position indices (int64); cross-entropy's log-softmax output over the
    vocabulary, the int64 targets and a scalar total weight."""
    d, layers, heads, ff, vocab, seq = (LM[k] for k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size",
                                                         "seq_len"))
    n = LM_BATCH * seq
    norm = (n * d + 2 * n) * FP32
    block = (norm + n * d * FP32 + n * 3 * d * FP32 + n * d * FP32 + LM_BATCH * heads * seq * FP32
             + norm + n * d * FP32 + 2 * n * ff * FP32)
    expected = (n * INT64 + seq * INT64 + layers * block + norm + n * d * FP32
                + n * vocab * FP32 + n * INT64 + FP32)
    measured = lm_run["memory"]["max"]["activations"]
    print(f"transformer activations: expected {expected} B, measured {measured} B")
    assert measured == pytest.approx(expected, rel=0.01)
