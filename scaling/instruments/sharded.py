"""The collectives of the sharded strategies, timed where they are issued; FSDP's gathered memory.

FSDP2 (``fully_shard``) issues its all-gathers and reduce-scatters itself, through
the comm objects its documented ``set_custom_all_gather`` /
``set_custom_reduce_scatter`` accept. ``TimedAllGather`` and ``TimedReduceScatter``
are such objects: they call what FSDP's defaults call (``all_gather_single``,
``reduce_scatter_single`` with the same ``async_op``) through ``CommTimer.issue``,
so each collective is timed from its issue to its completion (busy) and while
the training thread is held in it (exposed). An all-gather is ``allgather_fwd``
before the step's backward started and ``allgather_bwd`` after (FSDP gathers
again in backward when it resharded after forward, and prefetches the next
block there). Bytes on the wire: the gathered output of an all-gather and the
unsharded input of a reduce-scatter, FSDP's dim-0 padding included.

On CPU every one of them waits for completion before FSDP goes on (gloo,
``async_op=False``): busy and exposed are equal, nothing hides behind compute.
On CUDA they run on FSDP's own streams: busy is timed there, exposed where the
compute stream waits for them (``time_compute_waits``).

ZeRO-1's parameter broadcast (``ZeroRedundancyOptimizer.step`` broadcasts each
rank's updated partition, waiting for all of them before it returns) is timed
around the optimizer's own ``_sync_params``: kind ``broadcast``, every
parameter's bytes once.

``GatherTracker`` (on the memory step only) keeps, at every all-gather, the
parameter bytes gathered at once (blocks still unsharded plus the one being
gathered): ``params_unsharded``; and the flat all-gather outputs and
reduce-scatter inputs alive at once: ``comm_buffers``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from scaling import compat
from scaling.instruments.comm import CommTimer

AllGather, ReduceScatter = compat.fsdp_comm_bases()


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class GatherTracker:
    """The most FSDP parameter bytes gathered at once, and the most flat comm-buffer bytes alive at once."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.active = False
        self.unsharded_peak = 0
        self.buffers_peak = 0
        self._buffers: list[tuple[weakref.ref, int]] = []

    def _unsharded_bytes(self) -> int:
        """Parameters registered unsharded right now (a gathered block's are plain tensors, not DTensors)."""
        seen: set[int] = set()
        total = 0
        for param in self.model.parameters():
            if isinstance(param, DTensor):
                continue
            storage = param.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes() > 0:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def _buffer(self, tensor: torch.Tensor) -> None:
        self._buffers = [(ref, size) for ref, size in self._buffers if ref() is not None]
        self._buffers.append((weakref.ref(tensor), nbytes(tensor)))
        self.buffers_peak = max(self.buffers_peak, sum(size for _, size in self._buffers))

    def gathered(self, output: torch.Tensor) -> None:
        if self.active:
            # The block being gathered is not registered unsharded yet: its output counts for it.
            self.unsharded_peak = max(self.unsharded_peak, self._unsharded_bytes() + nbytes(output))
            self._buffer(output)

    def reduced(self, unsharded_input: torch.Tensor) -> None:
        if self.active:
            self._buffer(unsharded_input)


class _Timed:
    """What both timed FSDP collectives share: the timer, the memory tracker, plain allocation."""

    def __init__(self, comm: CommTimer, tracker: GatherTracker | None = None) -> None:
        self.comm = comm
        self.tracker = tracker

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class TimedAllGather(_Timed, AllGather):
    """FSDP's all-gather, timed (``allgather_fwd`` / ``allgather_bwd``)."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> Any:
        kind = "allgather_bwd" if self.comm.in_backward else "allgather_fwd"
        work = self.comm.issue(kind, nbytes(output_tensor),
                               lambda: compat.all_gather_into(output_tensor, input_tensor, group=group, async_op=async_op))
        if self.tracker is not None:
            self.tracker.gathered(output_tensor)
        return work


class TimedReduceScatter(_Timed, ReduceScatter):
    """FSDP's gradient reduce-scatter, timed (``reducescatter``)."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False) -> Any:
        if self.tracker is not None:
            self.tracker.reduced(input_tensor)
        return self.comm.issue("reducescatter", nbytes(input_tensor),
                               lambda: compat.reduce_scatter_into(output_tensor, input_tensor, op=op, group=group,
                                                                 async_op=async_op))


class TimedZeroRedundancyOptimizer(ZeroRedundancyOptimizer):
    """ZeRO-1: each rank steps its partition, then the partitions are broadcast; the broadcast is timed.

    ``broadcasting = False`` skips the broadcast (the no-communication control steps: the replicas
    drift apart, which those steps do not mind).
    """

    def __init__(self, params: Any, optimizer_class: type, comm: CommTimer | None = None, **defaults: Any) -> None:
        super().__init__(params, optimizer_class=optimizer_class, **defaults)
        compat.zero_sync_params(ZeroRedundancyOptimizer)
        self.comm = comm
        self.broadcasting = True
        # Every parameter is broadcast once per step, from the rank that owns it.
        self.broadcast_bytes = sum(nbytes(p) for group in self.param_groups for p in group["params"])

    def _sync_params(self) -> None:
        if not self.broadcasting:
            return
        sync = super()._sync_params
        if self.comm is None:
            sync()
        else:
            self.comm.issue("broadcast", self.broadcast_bytes, sync)


def time_compute_waits(module: torch.nn.Module, comm: CommTimer) -> bool:
    """On CUDA: FSDP's collectives' exposed time measured where the compute stream waits for them.

    FSDP runs its all-gathers and reduce-scatters on streams of its own and makes the
    compute stream wait for them only where it needs their result. Marks on the
    compute stream just before and after each such wait (``CommTimer.waited``) time
    what the compute stream actually waited for: for an all-gather, before the gathered
    block is copied out (``FSDPParamGroup.wait_for_unshard``, the wait made here
    first, so FSDP's own finds it done); for the reduce-scatters, each block's
    post-backward (where FSDP makes the compute stream wait for the oldest one when too
    many are in flight; the reduce-scatter itself is issued on its own stream) and FSDP's
    end-of-backward callback, where the compute stream waits for those still in flight.
    The compute stream's few kernels inside those two (gradient casts) count as waiting.

    False, with the exposure left at the issuing call's hold (an upper bound), where this
    torch lacks those internals.
    """
    try:
        groups = compat.fsdp_param_groups(module)
        states = compat.fsdp_states(module)
        originals = [(getattr(g, compat.FSDP_ALL_GATHER_WAIT), getattr(g, compat.FSDP_POST_BACKWARD)) for g in groups]
        finals = [getattr(state, compat.FSDP_BACKWARD_END) for state in states]
    except AttributeError:
        return False
    for group, (wait_for_unshard, post_backward) in zip(groups, originals):
        setattr(group, compat.FSDP_ALL_GATHER_WAIT, _all_gather_wait(group, wait_for_unshard, comm))
        setattr(group, compat.FSDP_POST_BACKWARD, _marked(post_backward, "reducescatter", comm))
    for state, final in zip(states, finals):
        setattr(state, compat.FSDP_BACKWARD_END, _marked(final, "reducescatter", comm))
    comm.waited_kinds = frozenset({"allgather_fwd", "allgather_bwd", "reducescatter"})
    return True


def _all_gather_wait(group: Any, original: Any, comm: CommTimer) -> Any:
    def wait_for_unshard(*args: Any, **kwargs: Any) -> Any:
        pending = compat.all_gather_in_flight(group)
        if pending is not None:
            event, work = pending
            start = comm.clock.mark()
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
            if isinstance(work, dist.Work):
                work.wait()
            comm.waited("allgather_bwd" if comm.in_backward else "allgather_fwd", start, comm.clock.mark())
        return original(*args, **kwargs)

    return wait_for_unshard


def _marked(original: Any, kind: str, comm: CommTimer) -> Any:
    """``original`` between two marks on the current (compute) stream: the wait for ``kind`` inside it."""

    def marked(*args: Any, **kwargs: Any) -> Any:
        start = comm.clock.mark()
        out = original(*args, **kwargs)
        comm.waited(kind, start, comm.clock.mark())
        return out

    return marked
