"""Training data served through a real DataLoader with a DistributedSampler.

Synthetic data sets are generated once, deterministically, so that the time to
fetch and collate a batch is real while no files are needed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from scaling.config import ConfigError, DataConfig


def synthetic_dataset(data: DataConfig, seed: int) -> tuple[Dataset, int]:
    """A dataset and its number of classes (the vocabulary for tokens)."""
    gen = torch.Generator().manual_seed(seed)
    n = data.num_samples
    kind = data.kind
    if kind == "images":
        x = torch.randn(n, data.channels, data.image_size, data.image_size, generator=gen)
        y = torch.randint(0, data.num_classes, (n,), generator=gen)
        return TensorDataset(x, y), data.num_classes
    if kind == "vectors":
        x = torch.randn(n, data.in_features, generator=gen)
        y = torch.randint(0, data.num_classes, (n,), generator=gen)
        return TensorDataset(x, y), data.num_classes
    if kind == "tokens":
        tokens = torch.randint(0, data.vocab_size, (n, data.seq_len + 1), generator=gen)
        return TensorDataset(tokens[:, :-1], tokens[:, 1:]), data.vocab_size
    raise ValueError(f"no synthetic data of kind {kind!r}")


def image_folder(data: DataConfig) -> tuple[Dataset, int]:
    from torchvision import datasets, transforms

    size = data.image_size
    transform = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    dataset = datasets.ImageFolder(data.root, transform=transform)
    return dataset, data.num_classes or len(dataset.classes)


def build_dataset(data: DataConfig, seed: int) -> tuple[Dataset, int]:
    return image_folder(data) if data.kind == "imagefolder" else synthetic_dataset(data, seed)


def check_dataset_size(samples: int, batch_size: int, world_size: int) -> None:
    if samples < batch_size * world_size:
        raise ConfigError(
            f"data has {samples} samples, fewer than one global batch ({batch_size} x {world_size}); "
            "raise data.num_samples or lower train.batch_size"
        )


class Batches:
    """An endless stream of (inputs, targets) on ``device``; epochs roll over inside it."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int,
                 device: torch.device, num_workers: int, seed: int) -> None:
        check_dataset_size(len(dataset), batch_size, world_size)
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=num_workers, pin_memory=device.type == "cuda",
                                 persistent_workers=num_workers > 0)
        self.device = device
        self.epoch = 0
        self._it: Iterator | None = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self.sampler.set_epoch(self.epoch)
            self._it = iter(self.loader)
        try:
            inputs, targets = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = None
            return self.next()
        non_blocking = self.device.type == "cuda"
        return inputs.to(self.device, non_blocking=non_blocking), targets.to(self.device, non_blocking=non_blocking)
