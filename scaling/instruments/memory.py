"""Memory held by one rank, by category.

Keys (bytes): ``params``, ``grads``, ``optimizer_state``, ``activations`` (peak
bytes saved for backward in one step, measured with saved-tensor hooks, each
storage counted once and parameters left out), ``comm_buffers`` (the DDP
gradient buckets as handed to the comm hook), ``peak`` (CUDA:
``max_memory_allocated``; CPU: growth of resident memory over the run) and
``rss_peak`` (the process's peak resident set), and ``autocast_weights``
(under autocast, the low-precision copies of the weights that autocast makes
and autograd saves: weights, not activations, so counted apart).

A sharded tensor (FSDP's DTensor parameters, gradients and optimizer state)
counts for what this rank holds of it: ``held_bytes`` counts the storages
behind the local shards, FSDP's dim-0 padding included.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import torch


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor, without importing ``torch.distributed.tensor`` (0.6 s of start-up on a
    CPU) where nothing has: a DTensor exists only once its module is loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``tensor``: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def tensor_bytes(tensors) -> int:
    return sum(local(t).numel() * t.element_size() for t in tensors if t is not None)


def held_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each once: a sharded tensor's padding counts, a view does not."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        storage = local(tensor).untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes() > 0:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def params_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(model.parameters())


def grads_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters())


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


_PEAK_FLOOR = {"rss": 0, "cuda": 0}
"""The peaks reached before a probe whose own arrays were taken out of the high-water marks."""


def rss_peak_bytes() -> int:
    return max(_PEAK_FLOOR["rss"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def cuda_peak_bytes(device: torch.device) -> int:
    return max(_PEAK_FLOOR["cuda"], torch.cuda.max_memory_allocated(device))


def reset_cuda_peak(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)
    _PEAK_FLOOR["cuda"] = 0


@contextmanager
def outside_peaks(device: torch.device) -> Iterator[None]:
    """Whatever runs inside (a probe's arrays) is no part of the memory peaks: the peaks reached before it are
    kept, and the high-water marks are set back to the present after it (on Linux, ``/proc/self/clear_refs``
    "5"; where that cannot be written the probe's arrays stay in the resident peak)."""
    rss_before = rss_peak_bytes()
    cuda_before = cuda_peak_bytes(device) if device.type == "cuda" else 0
    try:
        yield
    finally:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _PEAK_FLOOR["rss"] = rss_before
        except OSError:
            pass
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            _PEAK_FLOOR["cuda"] = cuda_before


VIEW_DEPTH = 4
"""How many view-like autograd nodes may lie between a saved tensor and the cast of a weight (e.g. ``t()``)."""


class SavedActivations:
    """Counts the bytes autograd saves for backward while active."""

    def __init__(self, model: torch.nn.Module, gathered: bool = False) -> None:
        """``gathered``: the model's parameters are gathered while they are used (FSDP), so which tensors
        are parameters is looked up again at every saved tensor (on the measured step only)."""
        self._model = model
        self._gathered = gathered
        self._lookup_params()
        self._seen: set[int] = set()
        self.bytes = 0
        self.autocast_weight_bytes = 0

    def _is_weight_cast(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is (a view of) a dtype cast of a parameter, as autocast makes them."""
        node = tensor.grad_fn
        cast = False
        for _ in range(VIEW_DEPTH + 1):
            if node is None:
                return False
            name = type(node).__name__
            if name == "AccumulateGrad":
                return cast and id(node.variable) in self._params
            if name.startswith("ToCopyBackward"):
                cast = True
            elif not name.startswith(("TBackward", "ViewBackward", "TransposeBackward", "PermuteBackward",
                                      "ExpandBackward", "UnsqueezeBackward", "ReshapeAliasBackward")):
                return False
            parents = [fn for fn, _ in node.next_functions if fn is not None]
            if len(parents) != 1:
                return False
            node = parents[0]
        return False

    def _lookup_params(self) -> None:
        params = [p for p in self._model.parameters() if not is_dtensor(p)]
        self._params = {id(p) for p in params}
        self._param_storages = {p.untyped_storage().data_ptr() for p in params}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._gathered:
            self._lookup_params()
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen and key not in self._param_storages and storage.nbytes() > 0:
            self._seen.add(key)
            if self._is_weight_cast(tensor):
                self.autocast_weight_bytes += storage.nbytes()
            else:
                self.bytes += storage.nbytes()
        return tensor

    @contextmanager
    def active(self) -> Iterator[SavedActivations]:
        self._seen.clear()
        self.bytes = 0
        self.autocast_weight_bytes = 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


def peak_bytes(device: torch.device, rss_at_start: int) -> int:
    if device.type == "cuda":
        return cuda_peak_bytes(device)
    return max(0, rss_peak_bytes() - rss_at_start)
