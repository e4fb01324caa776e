"""Typed, validated views of the Hydra config.

Every check runs before a process group exists, and every failure is a
``ConfigError`` whose message names the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from omegaconf import DictConfig, OmegaConf

Backend = Literal["auto", "gloo", "nccl"]
Device = Literal["auto", "cpu", "cuda"]
AmpMode = Literal["none", "bf16"]
WandbMode = Literal["offline", "online", "disabled"]
Model = Literal["resnet18", "resnet50", "transformer", "mlp"]
DataKind = Literal["images", "imagefolder", "tokens", "vectors"]
Optimizer = Literal["sgd", "adamw"]
Strategy = Literal["ddp", "zero1", "fsdp"]
STRATEGIES = get_args(Strategy)
BUILTIN_HOOKS = ("allreduce", "fp16", "bf16", "powersgd", "mpi")


class ConfigError(ValueError):
    """A configuration or command-line mistake, reported as one line."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


KEY = "key"
"""Field metadata: the key a user types when it is not ``<section>.<field>`` (``model=...`` for ModelConfig.name)."""


@functools.cache
def _declared(cls: type) -> tuple[tuple[str, str, tuple[Any, ...] | None], ...]:
    """(field, key, choices) of each field whose type says what it may hold: a ``Literal`` (its choices) or
    ``bool`` (None). The key is ``<cls.SECTION>.<field>`` unless the field's metadata names another."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        key = f.metadata.get(KEY, f"{cls.SECTION}.{f.name}")
        if get_origin(hint) is Literal:
            out.append((f.name, key, get_args(hint)))
        elif hint is bool:
            out.append((f.name, key, None))
    return tuple(out)


def check_declared(section: Any) -> None:
    """What a section's annotations declare, checked: a Literal field holds one of its choices, a bool field is
    true or false. The one-line errors come from the annotations, so the choices are written once."""
    for name, key, choices in _declared(type(section)):
        value = getattr(section, name)
        if choices is None:
            _require(isinstance(value, bool), f"{key} must be true or false (got {value!r})")
        else:
            _require(isinstance(value, str) and value in choices,
                     f"{key} must be one of {'|'.join(choices)} (got {value!r})")


def int_at_least(key: str, value: Any, lowest: int) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= lowest,
             f"{key} must be an integer >= {lowest} (got {value!r})")
    return value


def _positive_int(key: str, value: Any, allow_zero: bool = False) -> int:
    return int_at_least(key, value, 0 if allow_zero else 1)


def positive_number(key: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    _require(ok, f"{key} must be a number {'>=' if allow_zero else '>'} 0 (got {value!r})")
    return float(value)


@dataclass(frozen=True)
class TrainConfig:
    SECTION: typing.ClassVar[str] = "train"
    steps: int
    """Measured steps."""
    warmup_steps: int
    """Steps run before the measured ones, left out of every statistic."""
    batch_size: int
    """Samples per rank per step (ignored when global_batch_size is set)."""
    global_batch_size: int | None
    """When set, per-rank batch = global / world size (strong scaling)."""
    log_every: int
    """Steps between cross-rank gathers, flushes of steps.jsonl and progress lines."""
    amp: AmpMode
    """none | bf16 autocast."""
    seed: int

    def __post_init__(self) -> None:
        check_declared(self)
        _positive_int("train.steps", self.steps)
        _positive_int("train.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive_int("train.batch_size", self.batch_size)
        if self.global_batch_size is not None:
            _positive_int("train.global_batch_size", self.global_batch_size)
        _positive_int("train.log_every", self.log_every)

    def per_rank_batch(self, world_size: int) -> int:
        if self.global_batch_size is None:
            return self.batch_size
        _require(
            self.global_batch_size % world_size == 0,
            f"train.global_batch_size={self.global_batch_size} is not divisible by the world size "
            f"{world_size}; choose a multiple of {world_size}",
        )
        return self.global_batch_size // world_size


@dataclass(frozen=True)
class FsdpConfig:
    SECTION: typing.ClassVar[str] = "dist.fsdp"
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again in backward."""

    def __post_init__(self) -> None:
        check_declared(self)


@dataclass(frozen=True)
class DistConfig:
    SECTION: typing.ClassVar[str] = "dist"
    backend: Backend
    """auto (nccl with CUDA, else gloo) | gloo | nccl."""
    bucket_cap_mb: float
    """DDP gradient bucket size."""
    timeout_s: float
    """Process-group timeout: how long a rank waits for a dead or hung peer."""
    threads: int | str
    """Intra-op threads per process, or auto."""
    device: Device = "auto"
    """auto (CUDA with nccl, else CPU) | cpu | cuda (gloo can all-reduce CUDA tensors: several ranks on one GPU)."""
    gradient_as_bucket_view: bool = False
    """Gradients as views into DDP's buckets (PyTorch's default is false; see conf/config.yaml)."""
    strategy: Strategy = "ddp"
    """ddp (everything replicated) | zero1 (DDP + optimizer state sharded) | fsdp (FSDP2 fully_shard per block)."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    """dist.strategy=fsdp only."""
    pin: bool = False
    """Pin each process (and its threads) to its own equal share of the cores it may use, by local rank."""

    def __post_init__(self) -> None:
        check_declared(self)
        if isinstance(self.fsdp, dict):
            object.__setattr__(self, "fsdp", typed_section(FsdpConfig, "dist.fsdp", self.fsdp))
        _require(isinstance(self.fsdp, FsdpConfig),
                 f"dist.fsdp must be a section with reshard_after_forward (got {self.fsdp!r})")
        _require(not (self.backend == "nccl" and self.device == "cpu"),
                 "dist.device=cpu cannot use dist.backend=nccl (NCCL moves CUDA tensors only); use gloo")
        _require(
            isinstance(self.bucket_cap_mb, (int, float)) and self.bucket_cap_mb > 0,
            f"dist.bucket_cap_mb must be a number > 0 (got {self.bucket_cap_mb!r})",
        )
        _require(
            isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0,
            f"dist.timeout_s must be a number of seconds > 0 (got {self.timeout_s!r})",
        )
        if self.threads != "auto":
            _positive_int("dist.threads", self.threads)


@dataclass(frozen=True)
class CommConfig:
    hook: str
    """allreduce | fp16 | bf16 | powersgd | mpi | package.module:function."""
    powersgd_rank: int

    def __post_init__(self) -> None:
        _positive_int("comm.powersgd_rank", self.powersgd_rank)
        if self.hook in BUILTIN_HOOKS:
            return
        _require(
            ":" in self.hook,
            f"comm.hook must be one of {'|'.join(BUILTIN_HOOKS)} or package.module:function (got {self.hook!r})",
        )
        resolve_user_hook(self.hook)


def resolve_user_hook(spec: str):
    """Import ``package.module:function``; a ConfigError names what is missing."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"comm.hook={spec!r}: cannot import module {module_name!r} ({exc})") from None
    hook = getattr(module, func_name, None)
    _require(callable(hook), f"comm.hook={spec!r}: module {module_name!r} has no callable {func_name!r}")
    return hook


def boolean(key: str, value: Any) -> bool:
    """A setting read outside the typed sections (the study's) that must be true or false."""
    _require(isinstance(value, bool), f"{key} must be true or false (got {value!r})")
    return value


@dataclass(frozen=True)
class InstrumentConfig:
    SECTION: typing.ClassVar[str] = "instrument"
    enabled: bool
    """False: the same loop with nothing but a per-step wall clock."""
    flops: bool
    memory: bool
    control_steps: int = 5
    """No-communication steps run after the measured ones: the counterfactual of the efficiency waterfall."""
    ops: bool = True
    """Profile operators on a few more steps (after the control steps): ops.json and the roofline."""
    ops_steps: int = 3
    """Steps run under the profiler when instrument.ops is true."""
    timeline_steps: int = 4
    """The first measured steps written to timeline.json (a Chrome trace of every rank); 0 = none."""
    profile_trace: bool = False
    """Keep torch.profiler's own trace of the profiled steps (instrument.ops), per rank: profile/rank<R>.json."""
    host_probe: bool = True
    """A short GEMM and copy probe on every rank before and after the measured steps (scaling.instruments.hostprobe):
    run.json host_probe, and a slow host named in the findings."""

    def __post_init__(self) -> None:
        check_declared(self)
        _positive_int("instrument.control_steps", self.control_steps, allow_zero=True)
        _positive_int("instrument.ops_steps", self.ops_steps)
        _positive_int("instrument.timeline_steps", self.timeline_steps, allow_zero=True)


@dataclass(frozen=True)
class PathsConfig:
    root: str
    run_id: str | None

    def __post_init__(self) -> None:
        check_writable("paths.root", Path(self.root))
        if self.run_id is not None:
            _require(
                bool(self.run_id) and "/" not in self.run_id and self.run_id not in (".", ".."),
                f"paths.run_id must be a plain directory name (got {self.run_id!r})",
            )


def check_writable(key: str, path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    _require(probe.is_dir(), f"{key}={str(path)!r}: {str(probe)!r} exists and is not a directory")
    # A real write, not os.access: root passes every permission check, yet
    # cannot write to a read-only or virtual file system such as /proc.
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}={str(path)!r}: cannot write in {str(probe)!r} ({exc.strerror})") from None


@dataclass(frozen=True)
class WandbConfig:
    SECTION: typing.ClassVar[str] = "logger.wandb"
    mode: WandbMode
    project: str
    entity: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_declared(self)


MODEL_KINDS = {"resnet18": "resnet", "resnet50": "resnet", "transformer": "transformer", "mlp": "mlp"}
DATA_OF_MODEL = {"resnet": ("images", "imagefolder"), "transformer": ("tokens",), "mlp": ("vectors",)}
MODEL_SIZES = {"transformer": ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size"), "mlp": ("in_features", "hidden", "layers")}
"""The sizes each model kind needs (integers >= 1)."""
DATA_SIZES = {"images": ("num_samples", "image_size", "channels", "num_classes"), "imagefolder": ("image_size",),
              "tokens": ("num_samples", "seq_len", "vocab_size"), "vectors": ("num_samples", "in_features", "num_classes")}
"""The sizes each kind of data needs (integers >= 1)."""


def _positive_ints(section: str, config: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        _positive_int(f"{section}.{key}", getattr(config, key))


@dataclass(frozen=True)
class ModelConfig:
    SECTION: typing.ClassVar[str] = "model"
    name: Model = field(metadata={KEY: "model"})
    """resnet18 | resnet50 (torchvision) | transformer (decoder-only LM) | mlp (wide, parameter-heavy)."""
    kind: str
    """resnet | transformer | mlp: what the model is built from and which data it takes."""
    d_model: int | None = None
    """transformer: width."""
    n_layers: int | None = None
    """transformer: decoder blocks."""
    n_heads: int | None = None
    """transformer: attention heads (divide d_model)."""
    d_ff: int | None = None
    """transformer: feed-forward width."""
    vocab_size: int | None = None
    """transformer: tokens (the head is tied to the embedding)."""
    dropout: float = 0.0
    """transformer: attention dropout."""
    in_features: int | None = None
    """mlp: input width."""
    hidden: int | None = None
    """mlp: hidden width."""
    layers: int | None = None
    """mlp: hidden layers."""

    def __post_init__(self) -> None:
        check_declared(self)
        _require(self.kind == MODEL_KINDS[self.name],
                 f"model.kind must be {MODEL_KINDS[self.name]} for model={self.name} (got {self.kind!r})")
        _positive_ints("model", self, MODEL_SIZES.get(self.kind, ()))
        if self.kind == "transformer":
            _require(self.d_model % self.n_heads == 0,
                     f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")


@dataclass(frozen=True)
class DataConfig:
    SECTION: typing.ClassVar[str] = "data"
    name: str
    """synthetic_images | imagefolder | synthetic_tokens | synthetic_vectors (the conf/data file)."""
    kind: DataKind
    """images | imagefolder | tokens | vectors."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    num_samples: int | None = None
    """Synthetic data: samples in the dataset (the sampler splits it across ranks)."""
    image_size: int | None = None
    channels: int | None = None
    num_classes: int | None = None
    """Images and vectors: classes (imagefolder: null = the number of class folders)."""
    seq_len: int | None = None
    """Tokens: sequence length."""
    vocab_size: int | None = None
    in_features: int | None = None
    root: str | None = None
    """imagefolder: a folder of <class>/<image> files."""

    def __post_init__(self) -> None:
        check_declared(self)
        _positive_int("data.num_workers", self.num_workers, allow_zero=True)
        _positive_ints("data", self, DATA_SIZES[self.kind])
        if self.kind == "imagefolder":
            _require(self.root not in (None, "", "???"),
                     "data.root must be set for data=imagefolder (a folder of <class>/<image> files)")
            _require(Path(self.root).is_dir(),
                     f"data.root={self.root!r} is not a directory (data=imagefolder needs root/<class>/<image>)")


@dataclass(frozen=True)
class OptimConfig:
    SECTION: typing.ClassVar[str] = "optim"
    name: Optimizer = field(metadata={KEY: "optim"})
    """sgd | adamw."""
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    """sgd only."""

    def __post_init__(self) -> None:
        check_declared(self)
        for key in ("lr", "weight_decay", "momentum"):
            value = getattr(self, key)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                     f"optim.{key} must be a number >= 0 (got {value!r})")


@dataclass(frozen=True)
class RunConfig:
    """Everything the training job reads, validated."""

    exp_name: str
    train: TrainConfig
    dist: DistConfig
    comm: CommConfig
    instrument: InstrumentConfig
    paths: PathsConfig
    wandb: WandbConfig
    console: bool
    study_name: str
    study_kind: str
    peak_tflops: float | None
    peak_membw_GBps: float | None
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    raw: dict[str, Any]
    """The resolved config, as written to config.yaml."""

    def __post_init__(self) -> None:
        _require(bool(self.study_name) and "/" not in self.study_name, f"study.name must be a plain directory name (got {self.study_name!r})")
        if self.peak_tflops is not None:
            _require(
                isinstance(self.peak_tflops, (int, float)) and self.peak_tflops > 0,
                f"hardware.peak_tflops must be a number > 0 or null (got {self.peak_tflops!r})",
            )
        if self.peak_membw_GBps is not None:
            _require(
                isinstance(self.peak_membw_GBps, (int, float)) and not isinstance(self.peak_membw_GBps, bool)
                and self.peak_membw_GBps > 0,
                f"hardware.peak_membw_GBps must be a number > 0 or null (got {self.peak_membw_GBps!r})",
            )
        # DDP's first iteration is unlike the others (it rebuilds its buckets
        # from the order gradients arrived in), so it is never measured.
        _require(
            self.train.warmup_steps >= 1 or not self.instrument.enabled,
            "train.warmup_steps must be >= 1 when instrument.enabled=true: DDP's first step rebuilds its buckets",
        )
        _require(
            self.dist.strategy != "fsdp" or self.comm.hook == "allreduce",
            f"comm.hook={self.comm.hook} is a DDP communication hook; dist.strategy=fsdp reduce-scatters its "
            "gradients without DDP (use comm.hook=allreduce, or dist.strategy=ddp|zero1)",
        )
        _require(
            self.data.kind in DATA_OF_MODEL[self.model.kind],
            f"model={self.model.name} cannot train on data={self.data.name}: "
            "resnet takes synthetic_images|imagefolder, transformer synthetic_tokens, mlp synthetic_vectors",
        )


def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    value = cfg.get(key)
    _require(isinstance(value, dict), f"config section {key!r} is missing")
    return value


def typed_section(cls, key: str, section: dict[str, Any]):
    """``cls(**section)``; an unknown key or a missing one is a ConfigError naming it."""
    names = {f.name for f in cls.__dataclass_fields__.values()}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ConfigError(f"unknown key {key}.{unknown[0]}; valid keys: {', '.join(sorted(names))}")
    try:
        return cls(**section)
    except TypeError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolve interpolations; a missing mandatory value (???) becomes a ConfigError."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except Exception as exc:  # omegaconf.errors.MissingMandatoryValue and friends
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{key} must be set: it has no default (add {key}=... to the command line)") from None


def parse(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    raw = to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    study = raw.get("study") or {}
    logger = _section(raw, "logger")
    hardware = raw.get("hardware") or {}
    return RunConfig(
        exp_name=str(raw.get("exp_name", "default")),
        train=typed_section(TrainConfig, "train", _section(raw, "train")),
        dist=typed_section(DistConfig, "dist", _section(raw, "dist")),
        comm=typed_section(CommConfig, "comm", _section(raw, "comm")),
        instrument=typed_section(InstrumentConfig, "instrument", _section(raw, "instrument")),
        paths=typed_section(PathsConfig, "paths", _section(raw, "paths")),
        wandb=typed_section(WandbConfig, "logger.wandb", _section(logger, "wandb")),
        console=bool(logger.get("console", True)),
        study_name=str(study.get("name", "adhoc")),
        study_kind=str(study.get("kind", "adhoc")),
        peak_tflops=hardware.get("peak_tflops"),
        peak_membw_GBps=hardware.get("peak_membw_GBps"),
        model=typed_section(ModelConfig, "model", _section(raw, "model")),
        data=typed_section(DataConfig, "data", _section(raw, "data")),
        optim=typed_section(OptimConfig, "optim", _section(raw, "optim")),
        raw=raw,
    )
