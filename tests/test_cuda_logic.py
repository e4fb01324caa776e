"""What the CUDA paths decide, checked on a CPU: the logic of each, separated from the device.

- the op profile's pass of an operator, from an event list with device-side copies of the
  pass annotations (as a CUDA profile holds them);
- communication busy time as the union of intervals of every kind, and exposure from the
  compute stream's measured waits;
- the CUDA clock's events on its own device, whichever thread marks;
- more NCCL processes than GPUs on a node: one config line;
- the memory peak read over the measured steps, not after the control steps.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from scaling import cli
from scaling.config import ConfigError
from scaling.instruments import clock as clock_mod, ops
from scaling.instruments.clock import HostClock, clock_for
from scaling.instruments.comm import CollectiveEvent, CommTimer
from scaling.launch.group import cuda_device_index
from tests.jobs import TINY, load_run, only_run_dir

# -- the pass of an operator ---------------------------------------------------------------------


def _event(i: int, name: str, start_us: float, end_us: float, on_device: bool = False,
           kernel_us: float = 0.0) -> FunctionEvent:
    event = FunctionEvent(i, name, thread=0, start_us=start_us, end_us=end_us, use_device="cuda",
                          device_type=DeviceType.CUDA if on_device else DeviceType.CPU)
    if kernel_us:
        event.append_kernel(f"{name}_kernel", 0, kernel_us)
    return event


def cuda_profile() -> list[FunctionEvent]:
    """Three passes on the host; their device-side copies each start later and end after the next host pass
    began (the GPU runs behind the host). One operator per pass, each with a kernel."""
    return [
        _event(0, "scaling::forward", 0, 100), _event(1, "scaling::backward", 100, 200),
        _event(2, "scaling::optimizer", 200, 250),
        _event(3, "scaling::forward", 30, 160, on_device=True), _event(4, "scaling::backward", 160, 260, on_device=True),
        _event(5, "scaling::optimizer", 260, 300, on_device=True),
        _event(6, "aten::addmm", 10, 20, kernel_us=40), _event(7, "aten::mm", 110, 120, kernel_us=50),
        _event(8, "aten::_foreach_add_", 210, 215, kernel_us=9),
    ]


def test_an_operator_is_in_the_pass_the_host_called_it_in():
    times = ops.operator_times(cuda_profile(), cuda=True, counted={"aten::addmm", "aten::mm", "aten::_foreach_add_"})
    assert {key: (t.calls, round(t.time_s * 1e6)) for key, t in times.items()} == {
        ("forward", "aten::addmm"): (1, 40), ("backward", "aten::mm"): (1, 50),
        ("optimizer", "aten::_foreach_add_"): (1, 9)}


def test_a_backward_matrix_product_keeps_its_flops_and_its_kind():
    counted = {("backward", "aten::mm"): ops.OpCount(calls=1, flops=2e9, bytes=1e6, flops_from="flop_counter")}
    times = ops.operator_times(cuda_profile(), cuda=True, counted={"aten::mm"})
    rows = ops.OpMeasurement(1, "cuda:0", "cuda_kernel", times, counted, {}).rows({"fp32": 1e12}, 1e11)
    (row,) = [r for r in rows if r["op"] == "aten::mm"]
    assert (row["pass"], row["flops"], row["kind"]) == ("backward", 2e9, "arithmetic")


# -- busy as a union, exposure as the measured waits --------------------------------------------------

FSDP_KINDS = ("allgather_fwd", "allgather_bwd", "reducescatter")


def _fsdp_step(timer: CommTimer) -> None:
    """A backward in which a prefetched all-gather [0, 0.4] s and a reduce-scatter [0.2, 0.6] s overlap on
    streams of their own; the compute stream waited 0.05 s for each."""
    timer.collectives += [CollectiveEvent("allgather_bwd", 4000, 0.0, returned=0.4, done=0.4),
                          CollectiveEvent("reducescatter", 8000, 0.2, returned=0.6, done=0.6)]


def test_overlapping_kinds_are_busy_once():
    timer = CommTimer(HostClock(), world_size=2, kinds=FSDP_KINDS)
    _fsdp_step(timer)
    out = timer.resolve(timer.take_step())
    assert out["comm_allgather_bwd_s"] == pytest.approx(0.4)
    assert out["comm_reducescatter_s"] == pytest.approx(0.4)
    assert out["comm_s"] == pytest.approx(0.6)  # not 0.8
    assert out["algbw_GBps"] == pytest.approx(12000 / 0.6 / 1e9)
    assert out["busbw_GBps"] == pytest.approx(12000 * 0.5 / 0.6 / 1e9)


def test_exposure_is_what_the_compute_stream_waited_for():
    timer = CommTimer(HostClock(), world_size=2, kinds=FSDP_KINDS)
    timer.waited_kinds = frozenset(FSDP_KINDS)
    _fsdp_step(timer)
    timer.waited("allgather_bwd", 0.35, 0.4)
    timer.waited("reducescatter", 0.55, 0.6)
    out = timer.resolve(timer.take_step())
    assert out["comm_allgather_bwd_exposed_s"] == pytest.approx(0.05)
    assert out["comm_reducescatter_exposed_s"] == pytest.approx(0.05)
    assert out["comm_exposed_s"] == pytest.approx(0.1)
    assert out["overlap"] == pytest.approx(1 - 0.1 / 0.6)


def test_without_measured_waits_exposure_is_the_issuing_hold():
    timer = CommTimer(HostClock(), world_size=2, kinds=FSDP_KINDS)
    timer.collectives.append(CollectiveEvent("allgather_fwd", 4000, 1.0, returned=1.25, done=1.25))
    timer.waited("allgather_fwd", 1.2, 1.25)  # not a waited kind here: ignored
    out = timer.resolve(timer.take_step())
    assert out["comm_allgather_fwd_exposed_s"] == pytest.approx(0.25)


def test_fsdp_reaches_every_wait_the_exposure_marks():
    """The marks around FSDP's waits, installed as on CUDA, on a one-process CPU FSDP model: per step both
    blocks' forward all-gathers, their backward re-gathers, their post-backwards and the end-of-backward
    callback (queued by whichever block backward reaches first, not by the root)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from scaling.instruments.sharded import time_compute_waits

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        mesh = init_device_mesh("cpu", (1,))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        timer = CommTimer(HostClock(), world_size=1, kinds=FSDP_KINDS)
        assert time_compute_waits(model, timer)
        assert timer.waited_kinds == frozenset(FSDP_KINDS)
        for _ in range(2):
            out = model(torch.ones(2, 4))
            timer.begin_backward(timer.clock.mark())
            out.sum().backward()
            waits = timer.take_step().waits
            assert Counter(kind for kind, _, _ in waits) == {"allgather_fwd": 2, "allgather_bwd": 2,
                                                             "reducescatter": 3}
            assert all(end >= start for _, start, end in waits)
    finally:
        dist.destroy_process_group()


# -- the CUDA clock's device --------------------------------------------------------------------------


class _FakeCuda:
    """torch.cuda's events and streams as far as the clock uses them; a thread's current device is GPU 0
    unless it set one (as a backend's worker thread never does)."""

    def __init__(self) -> None:
        self.local = threading.local()

    def current_stream(self, device=None):
        index = device.index if device is not None else getattr(self.local, "device", 0)
        return ("stream", index)

    def event_class(self):
        cuda = self

        class Event:
            def __init__(self, enable_timing=False):
                self.stream = None

            def record(self, stream=None):
                self.stream = stream if stream is not None else cuda.current_stream()

        return Event


def test_a_completion_stamped_from_a_worker_thread_lands_on_the_ranks_gpu(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(clock_mod.torch.cuda, "Event", fake.event_class())
    monkeypatch.setattr(clock_mod.torch.cuda, "current_stream", fake.current_stream)
    clock = clock_for(torch.device("cuda", 1))
    fake.local.device = 1  # the rank's own thread, its device set
    launch = clock.mark()
    marks = []
    worker = threading.Thread(target=lambda: marks.append(clock.mark()))  # gloo's worker thread
    worker.start()
    worker.join()
    assert launch.stream == ("stream", 1)
    assert marks[0].stream == ("stream", 1)


# -- processes and GPUs -------------------------------------------------------------------------------


def test_one_gpu_per_nccl_process():
    assert [cuda_device_index(r, 4, 4, "nccl") for r in range(4)] == [0, 1, 2, 3]
    assert [cuda_device_index(r, 4, 2, "gloo") for r in range(4)] == [0, 1, 0, 1]  # gloo may share


def test_more_nccl_processes_than_gpus_is_one_config_line():
    with pytest.raises(ConfigError) as caught:
        cuda_device_index(1, 2, 1, "nccl")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("dist.backend=nccl: 2 processes on this node and 1 visible GPU:")
    assert "dist.backend=gloo" in message


# -- the memory peak's steps --------------------------------------------------------------------------


def test_the_memory_peak_is_that_of_the_measured_steps(tmp_path, monkeypatch):
    """The control steps run after the measured ones; a peak read after them would be theirs. The device's
    peak reading stands in as 'control steps run so far'."""
    from scaling.train import job, loop

    controls_run = {"n": 0}
    real_controls = loop.Trainer._run_controls

    def counted_controls(self, first_step):
        real_controls(self, first_step)
        controls_run["n"] += 1

    monkeypatch.setattr(loop.Trainer, "_run_controls", counted_controls)
    monkeypatch.setattr(loop.memory, "peak_bytes", lambda device, rss_at_start: 1000 + 1000 * controls_run["n"])
    cfg = cli.compose_config([*TINY["mlp"], "train.steps=2", "train.warmup_steps=1", "instrument.control_steps=2",
                              "instrument.ops=false", "instrument.flops=false", f"paths.root={tmp_path}"])
    job.train(cfg)
    run, _ = load_run(only_run_dir(tmp_path / "adhoc"))
    assert controls_run["n"] == 1
    assert run["memory"]["max"]["peak"] == 1000
