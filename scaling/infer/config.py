"""The ``infer`` section, typed and validated before anything is built or created."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import DictConfig

from scaling import config
from scaling.config import ConfigError, RunConfig, check_declared, int_at_least, positive_number

Scenario = Literal["single_stream", "offline", "server", "all"]
P99_MIN_QUERIES = 662
"""MLPerf LoadGen's smallest query count for a 99th-percentile latency bound (server scenario, ResNet-50)."""


@dataclass(frozen=True)
class InferConfig:
    SECTION: typing.ClassVar[str] = "infer"
    batch_sizes: list[int]
    """The sweep: one point per batch size, in the order given."""
    scenario: Scenario = "all"
    """single_stream | offline | server | all."""
    queries: int = 100
    """Timed queries per batch size, each synchronised: the recorded latency samples."""
    warmup_queries: int = 5
    """Untimed queries per batch size before the timed ones."""
    latency_budget_ms: float = 15.0
    """The p99 bound the server scenario's query rate must meet."""
    replicas: int = 1
    """Serving processes at once on this node."""
    server_max_batch: int | None = None
    """The dynamic batcher's largest batch (null: the largest of batch_sizes)."""
    server_timeout_ms: float = 2.0
    """How long the oldest waiting query holds back a partial batch."""
    server_queries: int = 1000
    """Poisson queries per tried rate (>= P99_MIN_QUERIES)."""
    server_search_step: float = 0.25
    """The rates tried are capacity x (1 + step)**k: the answer and the next rate up are this far apart."""
    seed: int = 0
    """Arrivals and service-time draws of the server scenario."""
    server_replay: bool = True
    """Serve the search's answer and the next rate up for real (Poisson queries in real time, the model)."""
    ops: bool = True
    """Profile one batch per size: compute_bound and memory_frac."""

    def __post_init__(self) -> None:
        sizes = self.batch_sizes
        if not (isinstance(sizes, list) and sizes
                and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)):
            raise ConfigError(f"infer.batch_sizes must be a non-empty list of integers >= 1 (got {sizes!r})")
        if len(set(sizes)) != len(sizes):
            raise ConfigError(f"infer.batch_sizes lists a batch size twice (got {sizes!r})")
        check_declared(self)
        int_at_least("infer.queries", self.queries, 1)
        int_at_least("infer.warmup_queries", self.warmup_queries, 0)
        positive_number("infer.latency_budget_ms", self.latency_budget_ms)
        int_at_least("infer.replicas", self.replicas, 1)
        if self.server_max_batch is not None:
            int_at_least("infer.server_max_batch", self.server_max_batch, 1)
            if self.server_max_batch > max(sizes):
                raise ConfigError(f"infer.server_max_batch={self.server_max_batch} is larger than every batch size "
                                  f"measured (largest {max(sizes)}); add it to infer.batch_sizes")
        positive_number("infer.server_timeout_ms", self.server_timeout_ms, allow_zero=True)
        int_at_least("infer.server_queries", self.server_queries, P99_MIN_QUERIES)
        positive_number("infer.server_search_step", self.server_search_step)
        int_at_least("infer.seed", self.seed, 0)

    @property
    def max_batch(self) -> int:
        return self.server_max_batch or max(self.batch_sizes)

    @property
    def runs_single_stream(self) -> bool:
        """Single-stream latencies: their own scenario, and the server's service times."""
        return self.scenario != "offline"

    @property
    def runs_offline(self) -> bool:
        return self.scenario in ("offline", "all")

    @property
    def runs_server(self) -> bool:
        return self.scenario in ("server", "all")


@dataclass(frozen=True)
class InferRun:
    """What ``python -m scaling.infer`` reads: the training config and the infer section."""

    run: RunConfig
    infer: InferConfig


def parse(cfg: DictConfig | dict[str, Any]) -> InferRun:
    raw = config.to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    section = raw.get("infer")
    if not isinstance(section, dict):
        raise ConfigError("config section 'infer' is missing")
    infer = config.typed_section(InferConfig, "infer", section)
    return InferRun(config.parse(raw), infer)
