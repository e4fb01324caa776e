"""Memory held by one rank, by category.

Keys (bytes): ``params``, ``grads``, ``optimizer_state``, ``activations`` (peak
bytes saved for backward in one step, measured with saved-tensor hooks, each
storage counted once and parameters left out), ``comm_buffers`` (the DDP
gradient buckets as handed to the comm hook), ``peak`` (CUDA:
``max_memory_allocated``; CPU: growth of resident memory over the run) and
``rss_peak`` (the process's peak resident set).
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import torch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def params_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(model.parameters())


def grads_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(
        value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)
    )


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class SavedActivations:
    """Counts the bytes autograd saves for backward while active."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen and key not in self._param_storages and storage.nbytes() > 0:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    @contextmanager
    def active(self) -> Iterator[SavedActivations]:
        self._seen.clear()
        self.bytes = 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


def peak_bytes(device: torch.device, rss_at_start: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return max(0, rss_peak_bytes() - rss_at_start)
