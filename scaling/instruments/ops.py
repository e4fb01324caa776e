"""The op profile: time, FLOPs and bytes of every operator, by pass.

A few training steps after the measured ones (left out of every other
statistic) run under ``torch.profiler``; one more step before them runs under
a dispatch mode that counts each operator's FLOPs and bytes. The two meet on
(pass, operator), the level at which PyTorch dispatches an operator to its
kernel: below composite operators such as ``aten::linear`` (which become
``aten::t`` and ``aten::addmm``), above the kernels' own helpers.

- ``time_s``: the operator's self time as a whole (its CPU time including the
  helpers it calls; on CUDA the time of the kernels it launched).
- ``flops``: ``torch.utils.flop_counter``'s formulas where it has one
  (matrix products, convolutions, attention: ``flops_from = flop_counter``);
  one FLOP per output element of an elementwise operator and per input
  element of a reduction (``elementwise``); none for the rest (normalisations,
  copies, indexing).
- ``bytes``: the operator's input and output tensors, each counted once per
  call (a view moves none): a lower bound of its memory traffic.
- ``pass``: forward, backward or optimizer, from the host-side time range the
  operator started in (backward's operators may run on the autograd engine's
  threads; the device-side copies of the ranges that CUDA profiles hold are
  later on the GPU timeline and say nothing of where an operator was called).

The rows are finished (intensity, achieved rates, kind) by
``scaling.instruments.roofline``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from scaling import compat
from scaling.instruments import roofline

ANNOTATION = "scaling::"
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
COPIES = ("aten::clone", "aten::_to_copy", "aten::copy_")
"""Elementwise by tag, yet no arithmetic."""
CONVOLUTIONS = ("convolution",)


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the duration (C++ log lines bypass Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass
class OpCount:
    calls: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    flops_from: str | None = None
    bytes_by_dtype: dict[str, float] = field(default_factory=dict)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel must touch: a broadcast (stride-0) view reads its storage once."""
    dense = t.numel() * t.element_size()
    try:
        return min(dense, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return dense


class OpCounter(TorchDispatchMode):
    """Per (pass, operator): calls, FLOPs and bytes, while ``phase`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.phase: str | None = None
        self.counts: dict[tuple[str, str], OpCount] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.phase is not None:
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        name = func._schema.name
        count = self.counts.setdefault((self.phase, name), OpCount())
        count.calls += 1
        inputs = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        outputs = _tensors(out)
        packet = func.overloadpacket
        formula = compat.flop_formula(packet)
        if formula is not None:
            count.flops += formula(*args, **kwargs, out_val=out)
            count.flops_from = "flop_counter"
        elif name not in COPIES and outputs and torch.Tag.pointwise in func.tags:
            count.flops += max(t.numel() for t in outputs)
            count.flops_from = "elementwise"
        elif compat.is_reduction(func) and inputs:
            count.flops += inputs[0].numel()
            count.flops_from = "elementwise"
        elif name.startswith("aten::_foreach_") and args and isinstance(args[0], (list, tuple)):
            count.flops += sum(t.numel() for t in args[0] if isinstance(t, torch.Tensor))
            count.flops_from = "elementwise"
        if func.is_view:
            return
        for t in (*inputs, *outputs):
            moved = _nbytes(t)
            count.bytes += moved
            key = PRECISIONS.get(t.dtype, str(t.dtype).removeprefix("torch."))
            count.bytes_by_dtype[key] = count.bytes_by_dtype.get(key, 0.0) + moved


@dataclass
class OpTime:
    calls: int = 0
    time_s: float = 0.0


def _is_operator(name: str) -> bool:
    namespace, sep, rest = name.partition("::")
    return bool(sep) and namespace not in ("autograd", "scaling", "profiler", "cuda", "Optimizer") \
        and namespace.replace("_", "").isalnum() and rest.replace("_", "").replace(".", "").isalnum()


def _is_composite(name: str, cache: dict[str, bool]) -> bool:
    """Whether an overload of the operator is composite (it dispatches to others, no kernel of its own).

    The profiler names operators without their overload (``aten::log_softmax``
    has only ``.int`` and ``.int_out``), so every overload is asked.
    """
    if name not in cache:
        namespace, _, op = name.partition("::")
        try:
            overloads = getattr(getattr(torch.ops, namespace), op).overloads()
        except (AttributeError, RuntimeError):
            overloads = []
        qualified = [name if o == "default" else f"{name}.{o}" for o in overloads]
        cache[name] = any(_has_composite_kernel(q) for q in qualified)
    return cache[name]


def _has_composite_kernel(qualified: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CompositeImplicitAutograd")
    except RuntimeError:  # an overload of TorchScript's own (aten::select.t), unknown to the dispatcher
        return False


def _calls_any(event, names: set[str]) -> bool:
    return any(child.name in names or _calls_any(child, names) for child in event.cpu_children)


def pass_ranges(events) -> list[tuple[float, float, str]]:
    """(start, end, pass) of each annotated pass on the host timeline.

    On CUDA the profiler also lists a device-side copy of every annotation, spanning the
    kernels launched in it: later on the GPU timeline, overlapping the host's next pass.
    Only the host's own ranges say in which pass an operator was called.
    """
    return sorted((e.time_range.start, e.time_range.end, e.name[len(ANNOTATION):]) for e in events
                  if e.name.startswith(ANNOTATION) and e.device_type == DeviceType.CPU)


def operator_times(events, cuda: bool, counted: set[str] = frozenset()) -> dict[tuple[str, str], OpTime]:
    """(pass, operator) -> calls and time, from the profiler's events.

    An operator is the outermost one of its call tree that the counting step
    saw (``counted``), else the outermost non-composite one; its time is its
    CPU time with everything it called (on CUDA the device time of the kernels
    it and its callees launched). Its pass is the annotated range it started
    in; operators outside the three passes (data loading) are left out.
    """
    ranges = pass_ranges(events)
    composite: dict[str, bool] = {}
    times: dict[tuple[str, str], OpTime] = {}

    def phase_at(start: float) -> str | None:
        for begin, end, phase in ranges:
            if begin <= start <= end:
                return phase
        return None

    def is_row(event) -> bool:
        if not _is_operator(event.name):
            return False
        if event.name in counted:
            return True
        return not _is_composite(event.name, composite) and not _calls_any(event, counted)

    def visit(event) -> None:
        if is_row(event):
            phase = phase_at(event.time_range.start)
            if phase is not None:
                seconds = (event.device_time_total if cuda else event.cpu_time_total) / 1e6
                entry = times.setdefault((phase, event.name), OpTime())
                entry.calls += 1
                entry.time_s += seconds
            return
        for child in event.cpu_children:
            visit(child)

    for event in events:
        if event.cpu_parent is None:
            visit(event)
    return times


def precision_of(name: str, count: OpCount, device: torch.device, runs_in_tf32: Callable[..., bool]) -> str:
    """The precision its arithmetic runs in: the dtype of most of its bytes, TF32 where it really applies."""
    if not count.bytes_by_dtype:
        return "fp32"
    precision = max(count.bytes_by_dtype, key=count.bytes_by_dtype.get)
    if precision == "fp32" and count.flops_from == "flop_counter":
        convolution = any(word in name for word in CONVOLUTIONS)
        if runs_in_tf32(device, torch.float32, convolutions=convolution):
            return "tf32"
    return precision


@dataclass
class OpMeasurement:
    """What the profiled steps measured, before the ceilings are known."""

    steps: int
    device: str
    time_source: str
    times: dict[tuple[str, str], OpTime]
    counts: dict[tuple[str, str], OpCount]
    precisions: dict[tuple[str, str], str]

    def precisions_with_flops(self) -> set[str]:
        return {self.precisions[key] for key, count in self.counts.items() if count.flops > 0}

    def rows(self, peaks: dict[str, float], peak_Bps: float) -> list[dict[str, Any]]:
        """One ops.json row per (pass, operator), FLOPs and bytes scaled to the profiled calls."""
        rows = []
        for (phase, name), timed in self.times.items():
            count = self.counts.get((phase, name))
            per_call = (lambda total: total / count.calls) if count and count.calls else (lambda total: 0.0)
            row = {"op": name, "pass": phase, "calls": timed.calls, "time_s": timed.time_s,
                   "flops": per_call(count.flops) * timed.calls if count else 0.0,
                   "bytes": per_call(count.bytes) * timed.calls if count else 0.0,
                   "precision": self.precisions.get((phase, name), "fp32"),
                   "flops_from": count.flops_from if count else None}
            rows.append(roofline.finish_row(row, peaks, peak_Bps))
        order = {p: i for i, p in enumerate(roofline.PASSES)}
        return sorted(rows, key=lambda r: (order[r["pass"]], -r["time_s"]))


class OpProfiler:
    """Drives the extra steps: ``step(phase)`` runs one training step, wrapping each pass in ``phase(name)``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.counter = OpCounter()

    @contextmanager
    def _counting_phase(self, name: str) -> Iterator[None]:
        self.counter.phase = name
        try:
            yield
        finally:
            self.counter.phase = None

    @staticmethod
    @contextmanager
    def _profiled_phase(name: str) -> Iterator[None]:
        with torch.profiler.record_function(ANNOTATION + name):
            yield

    def measure(self, step: Callable[[Callable[[str], Any]], None], steps: int,
                runs_in_tf32: Callable[..., bool] | None = None, trace_path: Path | None = None) -> OpMeasurement:
        """One counting step, then ``steps`` profiled ones; with ``trace_path`` the profiler's own trace of them is
        kept there (Chrome trace format, with the ``distributedInfo`` torch adds under a process group)."""
        cuda = self.device.type == "cuda"
        with self.counter:
            step(self._counting_phase)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no 'no GPU found' error line on a CPU host
        prof = torch.profiler.profile(activities=activities)
        with _stderr_silenced():  # the profiler's own start line, whatever its log level
            prof.start()
        try:
            for _ in range(steps):
                step(self._profiled_phase)
            if cuda:
                torch.cuda.synchronize(self.device)
        finally:
            with _stderr_silenced():
                prof.stop()
        if trace_path is not None:
            trace_path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace_path))
        counted = {name for _, name in self.counter.counts}
        times = operator_times(prof.events(), cuda, counted)
        tf32 = runs_in_tf32 or (lambda *args, **kwargs: False)
        precisions = {key: precision_of(key[1], count, self.device, tf32) for key, count in self.counter.counts.items()}
        return OpMeasurement(steps, str(self.device), "cuda_kernel" if cuda else "cpu_op", times,
                             self.counter.counts, precisions)


def ops_record(measurement: OpMeasurement, peaks: dict[str, float], peak_Bps: float,
               sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The content of ``ops.json``."""
    rows = measurement.rows(peaks, peak_Bps)
    ceilings = {"peak_flops_per_s": peaks, "peak_membw_Bps": peak_Bps,
                "ridge": {p: roofline.ridge(v, peak_Bps) for p, v in peaks.items()}, **(sources or {})}
    return {"steps": measurement.steps, "device": measurement.device, "time_source": measurement.time_source,
            "hardware": ceilings, "summary": roofline.summarize(rows), "rows": rows}


def profile_ops(step: Callable[[Callable[[str], Any]], None], steps: int, device: torch.device,
                runs_in_tf32: Callable[..., bool] | None = None, trace_path: Path | None = None) -> OpMeasurement:
    return OpProfiler(device).measure(step, steps, runs_in_tf32, trace_path)

