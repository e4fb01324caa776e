"""What a job is decided to be before any process group exists: ``prepare()`` detects the launch, resolves the
backend, the device, the batch per rank and the comm hook, builds the dataset and the model (the same initial
weights on every rank), and checks them, so that a configuration mistake ends the job in one line and never
reaches a collective. ``scaling.train.loop.Trainer`` takes the ``Job`` from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scaling.config import RunConfig
from scaling.launch import detect, group
from scaling.launch.layout import Launch
from scaling.records import schema
from scaling.train import hooks
from scaling.train.data import build_dataset, check_dataset_size
from scaling.train.models import build_model


@dataclass
class Job:
    """Everything decided before the process group exists."""

    cfg: RunConfig
    launch: Launch
    backend: str
    batch_size: int
    dataset: Any
    num_classes: int
    model: torch.nn.Module
    hook: hooks.HookChoice

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.launch.world_size

    @property
    def step_keys(self) -> tuple[str, ...]:
        """What each rank measures per step."""
        return schema.local_keys(self.cfg.instrument.enabled, self.launch.world_size, self.cfg.dist.strategy)

    @property
    def null_keys(self) -> tuple[str, ...]:
        """Keys without a value in this run (communication, for a single process)."""
        return schema.null_keys(self.cfg.instrument.enabled, self.launch.world_size)


def prepare(cfg: RunConfig) -> Job:
    launch = detect.detect()
    backend = group.resolve_backend(cfg.dist.backend)
    group.resolve_device(cfg.dist.device, backend)  # a CUDA request without CUDA fails here, not in the group
    batch_size = cfg.train.per_rank_batch(launch.world_size)
    hook = hooks.resolve(cfg.comm, backend, launch.launcher)
    dataset, num_classes = build_dataset(cfg.data, cfg.train.seed)
    check_dataset_size(len(dataset), batch_size, launch.world_size)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, cfg.data, num_classes)
    return Job(cfg, launch, backend, batch_size, dataset, num_classes, model, hook)
