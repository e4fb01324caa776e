"""Configuration: every experiment composes, every mistake is one clear line before any process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from scaling import cli, config
from scaling.train.job import main as train_main
from scaling.train.plan import prepare
from tests.jobs import REPO, TINY, single, torchrun

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "exp").glob("*.yaml"))


def test_the_three_spec_experiments_exist():
    assert {"resnet", "transformer", "mlp"} <= set(EXPERIMENTS)


def expected_parameters(cfg: config.RunConfig, classes: int) -> int | None:
    """Parameter count from the layer shapes the config asks for (or a published count), not from the model."""
    m = cfg.model
    if m.kind == "mlp":
        widths = [m.in_features] + [m.hidden] * m.layers + [classes]
        return sum(i * o + o for i, o in zip(widths[:-1], widths[1:]))  # weight and bias per Linear
    if m.kind == "transformer":
        d, ff = m.d_model, m.d_ff
        block = (2 * 2 * d  # two LayerNorms, weight and bias
                 + d * 3 * d + 3 * d + d * d + d  # qkv and output projections
                 + d * ff + ff + ff * d + d)  # feed-forward
        # token and position embeddings, the blocks, a final LayerNorm; the head shares the token embedding
        return m.vocab_size * d + cfg.data.seq_len * d + m.n_layers * block + 2 * d
    if m.name == "resnet18":
        # torchvision's published 11,689,512 with 1000 classes; the FC layer is 512 x classes + bias.
        return 11_689_512 - 513 * 1000 + 513 * classes
    return None


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_validates(exp):
    cfg = config.parse(cli.compose_config([f"+exp={exp}"]))
    assert cfg.exp_name == exp
    job = prepare(cfg)
    params = sum(p.numel() for p in job.model.parameters())
    expected = expected_parameters(cfg, job.num_classes)
    assert expected is not None, f"no independent parameter count for model {cfg.model.name}: add one here"
    assert params == expected
    assert job.batch_size == cfg.train.batch_size


def test_resnet_defaults_on_cpu():
    cfg = config.parse(cli.compose_config(["+exp=resnet"]))
    assert cfg.model.name == "resnet18"
    assert (cfg.data.image_size, cfg.data.num_classes, cfg.train.batch_size) == (32, 10, 32)
    assert config.parse(cli.compose_config(["+exp=resnet", "model=resnet50"])).model.name == "resnet50"


def test_mlp_has_far_more_gradient_bytes_per_flop_than_resnet():
    """The premise of the mlp experiment: per step, many gradient bytes for little compute."""
    from torch.utils.flop_counter import FlopCounterMode

    ratios = {}
    for exp in ("mlp", "resnet"):
        job = prepare(config.parse(cli.compose_config([f"+exp={exp}"])))
        x, _ = job.dataset[0:job.batch_size]
        with FlopCounterMode(display=False) as counter:
            job.model(x)
        ratios[exp] = sum(p.numel() for p in job.model.parameters()) * 4 / counter.get_total_flops()
    assert ratios["mlp"] > 4 * ratios["resnet"]


BAD = [
    (["+exp=nope"], "exp=nope: no such option; valid: mlp, resnet, transformer"),
    (["+exp=resnet", "model=resnet7"], "model=resnet7: no such option"),
    (["+exp=resnet", "train.steps=-1"], "train.steps must be an integer >= 1 (got -1)"),
    (["+exp=resnet", "train.batch_size=0"], "train.batch_size must be an integer >= 1 (got 0)"),
    (["+exp=resnet", "train.warmup_steps=-2"], "train.warmup_steps must be an integer >= 0"),
    (["+exp=resnet", "comm.hook=gossip"], "comm.hook must be one of allreduce|fp16|bf16|powersgd|mpi or package.module:function"),
    (["+exp=resnet", "comm.hook=no_such_pkg.hooks:f"], "comm.hook='no_such_pkg.hooks:f': cannot import module"),
    (["+exp=resnet", "comm.hook=tests.comm_hooks:missing"], "has no callable 'missing'"),
    (["+exp=resnet", "comm.hook=mpi"], "comm.hook=mpi needs the job to be launched with mpiexec"),
    (["+exp=resnet", "dist.backend=nccl"], "dist.backend=nccl needs CUDA"),
    (["+exp=resnet", "dist.backend=mpi"], "dist.backend must be one of auto|gloo|nccl"),
    (["+exp=resnet", "dist.timeout_s=0"], "dist.timeout_s must be a number of seconds > 0"),
    (["+exp=resnet", "logger.wandb.mode=cloud"], "logger.wandb.mode must be one of offline|online|disabled (got 'cloud')"),
    (["+exp=resnet", "data=imagefolder"], "data.root must be set: it has no default"),
    (["+exp=resnet", "data=imagefolder", "data.root=/nonexistent/images"], "data.root='/nonexistent/images' is not a directory"),
    (["+exp=resnet", "paths.root=/proc/runs"], "paths.root='/proc/runs'"),
    (["+exp=resnet", "train.amp=fp8"], "train.amp must be one of none|bf16"),
    (["+exp=resnet", "train.stepz=3"], "Could not override 'train.stepz'"),
    (["+exp=mlp", "data=synthetic_images"], "model=mlp cannot train on data=synthetic_images"),
    (["+exp=mlp", "instrument.enabled=no"], "instrument.enabled must be true or false (got 'no')"),
    (["+exp=mlp", "train.warmup_steps=0"], "train.warmup_steps must be >= 1 when instrument.enabled=true"),
    (["+exp=mlp", "instrument.timeline_steps=-1"], "instrument.timeline_steps must be an integer >= 0 (got -1)"),
    (["+exp=mlp", "train.batch_size=8", "data.num_samples=4"], "data has 4 samples, fewer than one global batch (8 x 1)"),
    (["+exp=mlp", "dist.strategy=zero3"], "dist.strategy must be one of ddp|zero1|fsdp (got 'zero3')"),
    (["+exp=mlp", "dist.fsdp.reshard_after_forward=maybe"],
     "dist.fsdp.reshard_after_forward must be true or false (got 'maybe')"),
    (["+exp=mlp", "dist.strategy=fsdp", "comm.hook=fp16"], "comm.hook=fp16 is a DDP communication hook; dist.strategy=fsdp"),
    (["+exp=mlp", "model.name=vgg"], "model must be one of resnet18|resnet50|transformer|mlp (got 'vgg')"),
    (["+exp=mlp", "optim.name=lamb"], "optim must be one of sgd|adamw (got 'lamb')"),
    (["+exp=mlp", "data.kind=audio"], "data.kind must be one of images|imagefolder|tokens|vectors (got 'audio')"),
    (["+exp=mlp", "dist.device=tpu"], "dist.device must be one of auto|cpu|cuda (got 'tpu')"),
    (["+exp=mlp", "dist.pin=1"], "dist.pin must be true or false (got 1)"),
]


def test_every_choice_and_switch_of_a_section_is_checked_from_its_annotation():
    """The choices are written once, as the field's Literal, and the checks come from the annotations: every
    setting below that takes a choice or true/false is checked (a field annotated plain ``str`` would drop out
    of this list and its check with it), and the error lists exactly the annotation's choices."""
    from scaling import config
    from scaling.infer.config import InferConfig

    sections = (config.TrainConfig, config.FsdpConfig, config.DistConfig, config.InstrumentConfig, config.WandbConfig,
                config.ModelConfig, config.DataConfig, config.OptimConfig, InferConfig)
    declared = {key: choices for cls in sections for _, key, choices in config._declared(cls)}
    switches = {"dist.fsdp.reshard_after_forward", "dist.gradient_as_bucket_view", "dist.pin", "instrument.enabled",
                "instrument.flops", "instrument.memory", "instrument.ops", "instrument.profile_trace",
                "instrument.host_probe", "infer.server_replay", "infer.ops"}
    assert declared == {**dict.fromkeys(switches),
                        "train.amp": ("none", "bf16"), "dist.backend": ("auto", "gloo", "nccl"),
                        "dist.device": ("auto", "cpu", "cuda"), "dist.strategy": ("ddp", "zero1", "fsdp"),
                        "logger.wandb.mode": ("offline", "online", "disabled"),
                        "model": ("resnet18", "resnet50", "transformer", "mlp"),
                        "data.kind": ("images", "imagefolder", "tokens", "vectors"), "optim": ("sgd", "adamw"),
                        "infer.scenario": ("single_stream", "offline", "server", "all")}


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o[1:] or o) for o, _ in BAD])
def test_mistakes_are_one_line_naming_the_key(overrides, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a job that got past validation would write runs/ here
    code = cli.run("scaling.train", train_main, argv=overrides)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not dist.is_initialized()
    assert not (tmp_path / "runs").exists()


def test_real_cli_error_has_no_traceback_and_exits_2(tmp_path):
    proc = single(["+exp=resnet", "train.batch_size=0", f"paths.root={tmp_path}"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "scaling.train: error: train.batch_size must be an integer >= 1 (got 0)"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_global_batch_not_divisible_by_world_size_under_torchrun(tmp_path):
    proc = torchrun(2, [*TINY["mlp"], "train.global_batch_size=7", f"paths.root={tmp_path}"])
    assert proc.returncode != 0
    assert "train.global_batch_size=7 is not divisible by the world size 2" in proc.stderr
    assert proc.stderr.count("scaling.train: error:") == 1  # rank 0 speaks for the job
    assert not list(Path(tmp_path).glob("*/*"))  # no run folder was made


def test_full_error_when_asked(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(config.ConfigError):
        cli.run("scaling.train", train_main, argv=["+exp=resnet", "train.steps=0"])


def test_global_batch_sets_per_rank_batch():
    cfg = config.parse(cli.compose_config(["+exp=resnet", "train.global_batch_size=64"]))
    assert [cfg.train.per_rank_batch(n) for n in (1, 2, 4)] == [64, 32, 16]
