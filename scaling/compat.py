"""The torch releases this package runs on, and every call that differs between them.

Supported: ``TORCH_RANGE`` (the same range as pyproject.toml's dependency). Its
lower end, 2.9.0, is the first release whose FSDP2 takes custom all-gather and
reduce-scatter objects (``FSDPModule.set_custom_all_gather`` /
``set_custom_reduce_scatter`` and the ``AllGather`` / ``ReduceScatter`` bases in
``_fsdp_api``), through which the FSDP collectives are timed; 2.8.0 has neither.
Its upper end is the newest release on the package index (2.15). An entry point
asks ``refusal()`` before it imports anything else of the package, so an
unsupported torch is one line, not an ImportError deep in FSDP.

What differs inside the range, each in one function here:

- ``all_gather_into`` / ``reduce_scatter_into``: ``dist.all_gather_single`` and
  ``dist.reduce_scatter_single`` (newer releases; what FSDP2's defaults call), else
  ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (every release).
- ``ddp_buffer_sync``: DDP's switch for the buffer broadcast before forward,
  ``forward_sync_buffers`` in newer releases, ``broadcast_buffers`` before.
- ``fsdp_comm_bases`` and ``fsdp_param_groups`` / ``fsdp_states``: FSDP2's comm
  bases and the internal objects at which the compute stream waits for a
  collective (timed on CUDA, ``scaling.instruments.sharded``).
- ``zero_sync_params``: ZeRO-1's parameter broadcast, ``ZeroRedundancyOptimizer._sync_params``.
- ``flop_formula``: ``torch.utils.flop_counter``'s formula of an operator; ``is_reduction``:
  the ``reduction`` operator tag (newer releases), else the operators it marks, by name.

The version check reads the installed distribution's metadata, without importing
torch; the rest imports torch when first called.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from collections.abc import Callable
from typing import Any

TORCH_RANGE = ("2.9", "2.16")
"""Oldest supported release (inclusive) and first unsupported one (exclusive)."""
TORCHVISION_RANGE = ("0.24", "0.30")
CI_TORCH = "2.14.1"
"""The release CI runs the whole suite on."""


def release(version: str) -> tuple[tuple[int, ...], bool]:
    """``2.11.0+cu130`` -> ((2, 11, 0), False); a pre-release or nightly (``2.16.0a0+git…``, ``2.16.0.dev…``)
    -> its release numbers and True."""
    match = re.match(r"(\d+(?:\.\d+)*)(.*)", version.strip())
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    numbers = tuple(int(n) for n in match.group(1).split("."))
    numbers = numbers + (0,) * (3 - len(numbers))
    return numbers, bool(re.match(r"\.?(a|b|rc|dev)", match.group(2).split("+")[0]))


def supported(version: str, bounds: tuple[str, str] = TORCH_RANGE) -> bool:
    """pip's reading of ``>=low,<high``: a pre-release ranks below its release, and none of ``high`` is in."""
    (low, _), (high, _) = (release(b) for b in bounds)
    numbers, pre = release(version)
    return (numbers > low or (numbers == low and not pre)) and numbers < high


def range_text(name: str = "torch", bounds: tuple[str, str] = TORCH_RANGE) -> str:
    return f"{name}>={bounds[0]},<{bounds[1]}"


def installed_version(name: str) -> str | None:
    """The installed distribution's version, from its metadata; else the module's ``__version__``; None if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        module = __import__(name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "")) or None


def refusal(version: str | None = None) -> str | None:
    """One line saying why this torch cannot run the package, or None when it can."""
    version = version if version is not None else installed_version("torch")
    if version is None:
        return f"torch is not installed; scaling needs {range_text()} (pip install -e . installs one)"
    if not supported(version):
        return (f"torch {version} is not supported; scaling needs {range_text()} (2.9.0 is the first release whose "
                f"FSDP2 takes custom collectives; pyproject.toml and scaling/compat.py state the range)")
    return None


def exit_if_unsupported(prog: str) -> None:
    """For an entry point, before it imports torch-dependent modules: one line on stderr and exit 2."""
    import sys

    from scaling.launch.layout import launch_rank

    line = refusal()
    if line is None:
        return
    if launch_rank() == 0:  # one line per job, not per rank (torchrun, Slurm, MPI)
        print(f"{prog}: error: {line}", file=sys.stderr)
    raise SystemExit(2)


# -- collectives ------------------------------------------------------------------------------------------


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def all_gather_into(output: Any, input: Any, group: Any = None, async_op: bool = False, dist: Any = None) -> Any:
    """Every rank's ``input`` concatenated into ``output`` (dim 0): ``all_gather_single`` where this torch has it."""
    dist = dist or _dist()
    call = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return call(output, input, group=group, async_op=async_op)


def reduce_scatter_into(output: Any, input: Any, op: Any = None, group: Any = None, async_op: bool = False,
                        dist: Any = None) -> Any:
    """``input`` reduced over the ranks, this rank's dim-0 slice into ``output``: ``reduce_scatter_single`` where
    this torch has it."""
    dist = dist or _dist()
    call = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return call(output, input, op=op if op is not None else dist.ReduceOp.SUM, group=group, async_op=async_op)


# -- DDP, ZeRO, the flop counter ----------------------------------------------------------------------------


def ddp_buffer_sync(enabled: bool, ddp_init: Callable[..., Any] | None = None) -> dict[str, bool]:
    """DDP's keyword for the buffer broadcast before forward, by the name this torch knows.

    Newer releases call it ``forward_sync_buffers`` (buffers are still made equal once at
    construction) and deprecate ``broadcast_buffers``.
    """
    if ddp_init is None:
        from torch.nn.parallel import DistributedDataParallel

        ddp_init = DistributedDataParallel.__init__
    if "forward_sync_buffers" in inspect.signature(ddp_init).parameters:
        return {"forward_sync_buffers": enabled}
    return {"broadcast_buffers": enabled}


ZERO_SYNC = "_sync_params"


def zero_sync_params(optimizer_class: type) -> str:
    """The name of ZeRO-1's parameter broadcast on ``ZeroRedundancyOptimizer`` (overridden to time it)."""
    if not callable(getattr(optimizer_class, ZERO_SYNC, None)):
        raise RuntimeError(f"this torch's ZeroRedundancyOptimizer has no {ZERO_SYNC}: its broadcast cannot be timed "
                           f"({range_text()} has it)")
    return ZERO_SYNC


REDUCTIONS = frozenset({
    "all", "amax", "amin", "aminmax", "any", "argmax", "argmin", "count_nonzero", "linalg__powsum",
    "linalg_vector_norm", "logsumexp", "max", "mean", "min", "nansum", "norm", "prod", "std", "std_mean", "sum",
    "var", "var_mean"})
"""The aten operators torch 2.14's ``reduction`` tag marks (the tag is newer than 2.9)."""


def is_reduction(func: Any, tags: Any = None) -> bool:
    """Whether an operator overload reduces its input: by its tag where this torch has one, else by name
    (``max.other`` and ``min.other`` are elementwise, not reductions)."""
    if tags is None:
        import torch

        tags = torch.Tag
    if hasattr(tags, "reduction"):
        return tags.reduction in func.tags
    packet, _, overload = func.name().removeprefix("aten::").partition(".")
    return func.namespace == "aten" and packet in REDUCTIONS and overload != "other"


def flop_formula(packet: Any) -> Callable[..., int] | None:
    """``torch.utils.flop_counter``'s FLOP formula of an operator (its overload packet), or None."""
    from torch.utils.flop_counter import flop_registry

    return flop_registry.get(packet)


# -- FSDP2 internals ----------------------------------------------------------------------------------------


def fsdp_comm_bases() -> tuple[type, type]:
    """FSDP2's ``AllGather`` and ``ReduceScatter`` comm bases (the objects ``set_custom_*`` accept)."""
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    return AllGather, ReduceScatter


def fsdp_param_groups(module: Any) -> list[Any]:
    """The FSDP parameter groups of every ``fully_shard``-ed module under ``module`` (those that gather)."""
    from torch.distributed.fsdp import FSDPModule

    groups = []
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            group = getattr(sub._get_fsdp_state(), "_fsdp_param_group", None)
            if group is not None:
                groups.append(group)
    return groups


def fsdp_states(module: Any) -> list[Any]:
    """The FSDP state of every ``fully_shard``-ed module under ``module``: whichever of them backward reaches
    first queues the end-of-backward callback (where the compute stream waits for the last reduce-scatters)."""
    from torch.distributed.fsdp import FSDPModule

    return [sub._get_fsdp_state() for sub in module.modules() if isinstance(sub, FSDPModule)]


FSDP_ALL_GATHER_WAIT = "wait_for_unshard"
"""FSDPParamGroup's method that makes the compute stream wait for the group's all-gather (then copies out)."""
FSDP_POST_BACKWARD = "post_backward"
"""FSDPParamGroup's method run as a block's gradients are ready: it issues the block's reduce-scatter and, where
too many are in flight, makes the compute stream wait for the oldest."""
FSDP_BACKWARD_END = "_root_post_backward_final_callback"
"""FSDPState's end-of-backward callback: the compute stream waits there for the reduce-scatters in flight."""


def all_gather_in_flight(group: Any) -> tuple[Any, Any] | None:
    """(event, work) of the parameter group's all-gather not yet waited for, or None.

    The event is recorded on FSDP's all-gather stream (synchronous ops); the work is set instead
    for asynchronous ones. Either makes the current stream wait when waited on.
    """
    result = getattr(group, "_all_gather_result", None)
    if not result:
        return None
    return getattr(result, "all_gather_event", None), getattr(result, "all_gather_work", None)
