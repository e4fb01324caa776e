"""One batch size, measured: per-query latencies, back-to-back throughput, memory and the op profile.

Every forward runs under ``torch.inference_mode()`` (and the training job's
autocast when ``train.amp=bf16``) on a model in eval mode. A ``forward`` stall
of ``SCALING_INJECT_STALL`` (``scaling.train.faults``) sleeps inside every
forward: a service time of known size, for checking what the scenarios recover.

Single stream and offline are measured apart: the single-stream latencies are
``queries`` queries, one at a time; offline is ``queries`` batches back to back
with one synchronisation at the end (its throughput, batch and total time, and
no latency of its own).

Memory keys (bytes): ``weights`` (parameters and buffers), ``activations``
(the most bytes of intermediate tensors alive at once during one forward,
tracked at the dispatcher: a lower bound, as a view can keep a storage alive
past its first tensor) and ``peak`` (CUDA: ``max_memory_allocated`` over one
forward; CPU, where the resident-set high-water mark cannot be reset per batch
size: weights + inputs + activations).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scaling.instruments.flops import runs_in_tf32
from scaling.instruments.memory import tensor_bytes
from scaling.instruments.ops import OpMeasurement, profile_ops
from scaling.train.faults import Injector


class LiveBytes(TorchDispatchMode):
    """The high-water mark of bytes held by tensors the operators created, while active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        if key in self._held:
            self._held.discard(key)
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._held:
                continue
            self._held.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, key, nbytes)
        return out


@dataclass(frozen=True)
class Offline:
    """``queries`` batches sent back to back: the throughput of one batch size with every query available at once."""

    queries: int
    batch_size: int
    total_s: float

    @property
    def samples_per_s(self) -> float:
        return self.batch_size * self.queries / self.total_s


@dataclass
class Point:
    """What one batch size measured on this process."""

    batch_size: int
    latency_samples_s: list[float] | None
    """Single stream: each query's time (None when the scenario is offline alone)."""
    offline: Offline | None
    memory: dict[str, int]
    ops: OpMeasurement | None
    server_service_s: list[float] | None = None
    """Server scenario: each batch's service time in the serving loop (``scaling.infer.live.service_times``)."""
    server_issue_lag_s: list[float] | None = None
    """Server scenario: how late the serving loop's generator issued one query per batch."""


class Server:
    """The model ready to answer queries of any batch size from a fixed pool of inputs."""

    def __init__(self, model: torch.nn.Module, inputs: torch.Tensor, device: torch.device,
                 amp_dtype: torch.dtype | None, injector: Injector | None = None) -> None:
        self.model = model.to(device).eval()
        self.pool = inputs
        self.device = device
        self.amp_dtype = amp_dtype
        self.injector = injector or Injector(0, [])
        self.forwards = 0

    def batch(self, size: int) -> torch.Tensor:
        index = torch.arange(size) % len(self.pool)
        return self.pool[index].to(self.device)

    def autocast(self) -> AbstractContextManager:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, x: torch.Tensor, mode: Callable[[], AbstractContextManager] = torch.inference_mode) -> Any:
        if self.injector:
            self.injector.stall("forward", self.forwards)
        self.forwards += 1
        with mode(), self.autocast():
            return self.model(x)

    def latencies(self, x: torch.Tensor, queries: int) -> list[float]:
        """Single stream: each query sent when the previous one has returned."""
        out = []
        for _ in range(queries):
            start = time.perf_counter()
            self.forward(x)
            self.sync()
            out.append(time.perf_counter() - start)
        return out

    def offline(self, x: torch.Tensor, queries: int) -> Offline:
        """Offline: every query available at once, sent back to back, one synchronisation at the end."""
        self.sync()
        start = time.perf_counter()
        for _ in range(queries):
            self.forward(x)
        self.sync()
        return Offline(queries, x.shape[0], time.perf_counter() - start)

    def memory(self, x: torch.Tensor) -> dict[str, int]:
        weights = tensor_bytes(self.model.parameters()) + tensor_bytes(self.model.buffers())
        tracker = LiveBytes()
        with tracker:
            out = self.forward(x)
        del out
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.forward(x)
            self.sync()
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = weights + tensor_bytes([x]) + tracker.peak
        return {"weights": weights, "activations": tracker.peak, "peak": peak}

    def profile(self, x: torch.Tensor) -> OpMeasurement:
        """One counted forward and one profiled forward of this batch.

        Under ``no_grad`` rather than ``inference_mode``: the same kernels, but
        inference mode hands ``aten::linear`` to the counter undecomposed, and
        the FLOP counter knows ``addmm``, not ``linear``.
        """
        def step(phase: Callable[[str], AbstractContextManager]) -> None:
            with phase("forward"):
                self.forward(x, torch.no_grad)

        return profile_ops(step, 1, self.device, runs_in_tf32=runs_in_tf32)

    def measure(self, batch_size: int, queries: int, warmup: int, single_stream: bool, offline: bool,
                ops: bool) -> Point:
        x = self.batch(batch_size)
        for _ in range(warmup):
            self.forward(x)
        self.sync()
        samples = self.latencies(x, queries) if single_stream else None
        back_to_back = self.offline(x, queries) if offline else None
        memory = self.memory(x)
        measurement = self.profile(x) if ops else None
        return Point(batch_size, samples, back_to_back, memory, measurement)
