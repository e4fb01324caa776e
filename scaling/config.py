"""Typed, validated views of the Hydra config.

Every check runs before a process group exists, and every failure is a
``ConfigError`` whose message names the key and what would be valid.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
BUILTIN_HOOKS = ("allreduce", "fp16", "bf16", "powersgd", "mpi")
AMP_MODES = ("none", "bf16")
WANDB_MODES = ("offline", "online", "disabled")
MODELS = ("resnet18", "resnet50", "transformer", "mlp")
DATA_KINDS = ("images", "imagefolder", "tokens", "vectors")
OPTIMIZERS = ("sgd", "adamw")
STRATEGIES = ("ddp", "zero1", "fsdp")


class ConfigError(ValueError):
    """A configuration or command-line mistake, reported as one line."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(key: str, value: Any, allow_zero: bool = False) -> int:
    lowest = 0 if allow_zero else 1
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= lowest,
        f"{key} must be an integer >= {lowest} (got {value!r})",
    )
    return value


@dataclass(frozen=True)
class TrainConfig:
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
    amp: str
    """none | bf16 autocast."""
    seed: int

    def __post_init__(self) -> None:
        _positive_int("train.steps", self.steps)
        _positive_int("train.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive_int("train.batch_size", self.batch_size)
        if self.global_batch_size is not None:
            _positive_int("train.global_batch_size", self.global_batch_size)
        _positive_int("train.log_every", self.log_every)
        _require(self.amp in AMP_MODES, f"train.amp must be one of {'|'.join(AMP_MODES)} (got {self.amp!r})")

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
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again in backward."""

    def __post_init__(self) -> None:
        _boolean("dist.fsdp.reshard_after_forward", self.reshard_after_forward)


@dataclass(frozen=True)
class DistConfig:
    backend: str
    """auto (nccl with CUDA, else gloo) | gloo | nccl."""
    bucket_cap_mb: float
    """DDP gradient bucket size."""
    timeout_s: float
    """Process-group timeout: how long a rank waits for a dead or hung peer."""
    threads: int | str
    """Intra-op threads per process, or auto."""
    device: str = "auto"
    """auto (CUDA with nccl, else CPU) | cpu | cuda (gloo can all-reduce CUDA tensors: several ranks on one GPU)."""
    gradient_as_bucket_view: bool = False
    """Gradients as views into DDP's buckets (PyTorch's default is false; see conf/config.yaml)."""
    strategy: str = "ddp"
    """ddp (everything replicated) | zero1 (DDP + optimizer state sharded) | fsdp (FSDP2 fully_shard per block)."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    """dist.strategy=fsdp only."""
    pin: bool = False
    """Pin each process (and its threads) to its own equal share of the cores it may use, by local rank."""

    def __post_init__(self) -> None:
        _require(self.strategy in STRATEGIES,
                 f"dist.strategy must be one of {'|'.join(STRATEGIES)} (got {self.strategy!r})")
        if isinstance(self.fsdp, dict):
            object.__setattr__(self, "fsdp", _typed(FsdpConfig, "dist.fsdp", self.fsdp))
        _require(isinstance(self.fsdp, FsdpConfig),
                 f"dist.fsdp must be a section with reshard_after_forward (got {self.fsdp!r})")
        _require(self.backend in BACKENDS, f"dist.backend must be one of {'|'.join(BACKENDS)} (got {self.backend!r})")
        _require(self.device in DEVICES, f"dist.device must be one of {'|'.join(DEVICES)} (got {self.device!r})")
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
        _boolean("dist.gradient_as_bucket_view", self.gradient_as_bucket_view)
        _boolean("dist.pin", self.pin)


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


def _boolean(key: str, value: Any) -> None:
    _require(isinstance(value, bool), f"{key} must be true or false (got {value!r})")


@dataclass(frozen=True)
class InstrumentConfig:
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
        for name in ("enabled", "flops", "memory", "ops", "host_probe", "profile_trace"):
            _boolean(f"instrument.{name}", getattr(self, name))
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
    mode: str
    project: str
    entity: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.mode in WANDB_MODES, f"logger.wandb.mode must be one of {'|'.join(WANDB_MODES)} (got {self.mode!r})")


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
    name: str
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
        _require(self.name in MODELS, f"model must be one of {'|'.join(MODELS)} (got {self.name!r})")
        _require(self.kind == MODEL_KINDS[self.name],
                 f"model.kind must be {MODEL_KINDS[self.name]} for model={self.name} (got {self.kind!r})")
        _positive_ints("model", self, MODEL_SIZES.get(self.kind, ()))
        if self.kind == "transformer":
            _require(self.d_model % self.n_heads == 0,
                     f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")


@dataclass(frozen=True)
class DataConfig:
    name: str
    """synthetic_images | imagefolder | synthetic_tokens | synthetic_vectors (the conf/data file)."""
    kind: str
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
        _require(self.kind in DATA_KINDS, f"data.kind must be one of {'|'.join(DATA_KINDS)} (got {self.kind!r})")
        _positive_int("data.num_workers", self.num_workers, allow_zero=True)
        _positive_ints("data", self, DATA_SIZES[self.kind])
        if self.kind == "imagefolder":
            _require(self.root not in (None, "", "???"),
                     "data.root must be set for data=imagefolder (a folder of <class>/<image> files)")
            _require(Path(self.root).is_dir(),
                     f"data.root={self.root!r} is not a directory (data=imagefolder needs root/<class>/<image>)")


@dataclass(frozen=True)
class OptimConfig:
    name: str
    """sgd | adamw."""
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    """sgd only."""

    def __post_init__(self) -> None:
        _require(self.name in OPTIMIZERS, f"optim must be one of {'|'.join(OPTIMIZERS)} (got {self.name!r})")
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


def _typed(cls, key: str, section: dict[str, Any]):
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
        train=_typed(TrainConfig, "train", _section(raw, "train")),
        dist=_typed(DistConfig, "dist", _section(raw, "dist")),
        comm=_typed(CommConfig, "comm", _section(raw, "comm")),
        instrument=_typed(InstrumentConfig, "instrument", _section(raw, "instrument")),
        paths=_typed(PathsConfig, "paths", _section(raw, "paths")),
        wandb=_typed(WandbConfig, "logger.wandb", _section(logger, "wandb")),
        console=bool(logger.get("console", True)),
        study_name=str(study.get("name", "adhoc")),
        study_kind=str(study.get("kind", "adhoc")),
        peak_tflops=hardware.get("peak_tflops"),
        peak_membw_GBps=hardware.get("peak_membw_GBps"),
        model=_typed(ModelConfig, "model", _section(raw, "model")),
        data=_typed(DataConfig, "data", _section(raw, "data")),
        optim=_typed(OptimConfig, "optim", _section(raw, "optim")),
        raw=raw,
    )
