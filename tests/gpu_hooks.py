"""A DDP communication hook for CUDA checks (``comm.hook=tests.gpu_hooks:device_delayed_allreduce``).

Plain all-reduce whose result is held back on the device by a spin kernel of
SCALING_TEST_DELAY_S seconds per bucket, all on one stream so that the delays
of a step add up (one communication channel). A host-side sleep would not do
on a GPU: while the host sleeps the device is still working through the
backward kernels queued before, so part of a host delay is hidden and the
cause would not be of known size. A delay on the device is what a slow
collective kernel is.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

_state: dict[str, object] = {}


def _cycles_per_second() -> float:
    """Measured once: how many spin cycles ``torch.cuda._sleep`` takes per second on the current device."""
    if "rate" not in _state:
        cycles = 50_000_000
        torch.cuda._sleep(cycles)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _state["rate"] = cycles / (start.elapsed_time(end) / 1e3)
    return float(_state["rate"])


def device_delayed_allreduce(state, bucket):
    delay = float(os.environ.get("SCALING_TEST_DELAY_S", "0"))

    device = bucket.buffer().device

    def late(fut):
        # Called on the backend's worker thread, whose current device is GPU 0: the bucket's own
        # device is made current, or the delay would run on GPU 0 for every rank.
        result = fut.value()
        if delay > 0:
            with torch.cuda.device(device):
                if f"stream{device.index}" not in _state:
                    _state[f"stream{device.index}"] = torch.cuda.Stream(device)
                channel = _state[f"stream{device.index}"]
                current = torch.cuda.current_stream(device)
                channel.wait_stream(current)
                with torch.cuda.stream(channel):
                    torch.cuda._sleep(int(delay * _cycles_per_second()))
                current.wait_stream(channel)
        return result

    return default_hooks.allreduce_hook(state, bucket).then(late)


def delay_collectives() -> None:
    """Put SCALING_TEST_DELAY_S of spin on the device before every collective of SCALING_TEST_DELAY_KIND.

    ``reducescatter`` / ``allgather``: FSDP's (through ``scaling.compat``, which the timed FSDP
    collectives call), on the stream FSDP issues them on; ``broadcast``: ZeRO-1's parameter
    broadcast of CUDA tensors, on the compute stream. Called in each rank before the training
    job starts (``scripts/gpu_check.py``'s exposure group); without the two variables it does nothing.
    """
    import torch.distributed as dist

    from scaling import compat

    kind, delay = os.environ.get("SCALING_TEST_DELAY_KIND"), float(os.environ.get("SCALING_TEST_DELAY_S", "0"))
    if not kind or delay <= 0:
        return

    def delayed(call, tensor_of):
        def collective(*args, **kwargs):
            tensor = tensor_of(args, kwargs)
            if tensor is not None and tensor.is_cuda:
                with torch.cuda.device(tensor.device):
                    torch.cuda._sleep(int(delay * _cycles_per_second()))
            return call(*args, **kwargs)

        return collective

    if kind == "reducescatter":
        compat.reduce_scatter_into = delayed(compat.reduce_scatter_into, lambda a, k: a[1] if len(a) > 1 else None)
    elif kind == "allgather":
        compat.all_gather_into = delayed(compat.all_gather_into, lambda a, k: a[1] if len(a) > 1 else None)
    elif kind == "broadcast":
        dist.broadcast = delayed(dist.broadcast, lambda a, k: k.get("tensor", a[0] if a else None))
    else:
        raise ValueError(f"SCALING_TEST_DELAY_KIND={kind}: reducescatter, allgather or broadcast")
