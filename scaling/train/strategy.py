"""How the model is spread over the ranks: ``dist.strategy`` ddp | zero1 | fsdp.

- ``ddp``: DistributedDataParallel. Every rank holds all parameters, gradients
  and optimizer state; gradients are all-reduced in buckets through the
  (timed) communication hook.
- ``zero1``: the same DDP for the gradients, and ``ZeroRedundancyOptimizer``
  (ZeRO stage 1): each rank keeps the optimizer state of its partition of the
  parameters, updates that partition and broadcasts it to the others.
- ``fsdp``: FSDP2 ``fully_shard`` on every block, then on the root. A block is
  a child of the model that holds parameters; the elements of a child
  ModuleList or Sequential are blocks of their own (ResNet's BasicBlocks, the
  transformer's decoder blocks). A parameter shared by two blocks (a tied
  embedding and head) stays with the root, which keeps its parameters
  gathered from forward through backward. Parameters, gradients and optimizer
  state are sharded on dim 0; a block's parameters are gathered before its
  forward and, with ``dist.fsdp.reshard_after_forward=true``, freed after it
  and gathered again in backward; its gradients are reduce-scattered. With
  ``train.amp=bf16`` the gathered parameters are bf16 (MixedPrecisionPolicy,
  gradients reduced in fp32).

At world size 1 there is no peer: the model trains unwrapped whatever the
strategy (``effective`` is ``none``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling import compat
from scaling.config import OptimConfig, RunConfig
from scaling.instruments import memory
from scaling.instruments.comm import CommTimer, wire_count
from scaling.instruments.memory_model import ParamSpec, predict
from scaling.launch.group import Context
from scaling.records.schema import STRATEGY_KINDS
from scaling.train import hooks

NO_CONTROLS_FSDP = ("no control steps: FSDP gathers every block's parameters in every step, so no step "
                    "without communication exists")


def optimizer_class(optim: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    if optim.name == "adamw":
        return torch.optim.AdamW, {"lr": optim.lr, "weight_decay": optim.weight_decay}
    return torch.optim.SGD, {"lr": optim.lr, "momentum": optim.momentum, "weight_decay": optim.weight_decay}


def make_optimizer(optim: OptimConfig, params) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_class(optim)
    return cls(params, **kwargs)


def scaled_backward(loss: torch.Tensor, scale: float) -> None:
    """Backward from ``loss * scale`` (from ``loss`` itself where the scale is 1: no extra operator)."""
    (loss * scale if scale != 1.0 else loss).backward()


def fsdp_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks ``fully_shard`` wraps one by one (in forward order for the models here), root excluded."""
    candidates: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            candidates += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            candidates.append((name, child))
    candidates = [(name, m) for name, m in candidates if any(True for _ in m.parameters())]
    owners: dict[int, int] = {}
    for _, module in candidates:
        for param in module.parameters():
            owners[id(param)] = owners.get(id(param), 0) + 1
    return [(name, m) for name, m in candidates if all(owners[id(p)] == 1 for p in m.parameters())]


def param_specs(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> list[ParamSpec]:
    """The model's parameters (before any sharding) with the block each belongs to."""
    block_of = {id(p): i for i, (_, module) in enumerate(blocks) for p in module.parameters()}
    return [ParamSpec(p.numel(), p.shape[0] if p.dim() else 1, p.element_size(), block_of.get(id(p)))
            for p in model.parameters()]


@dataclass
class Parallel:
    """The wrapped model, its optimizer and what the loop needs to know about the strategy."""

    requested: str
    effective: str
    """The strategy that runs: ``none`` at world size 1."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sync_buffers: bool = False
    """The loop broadcasts buffers before forward itself (DDP's broadcast_buffers, timed as comm_sync_s)."""
    specs: list[ParamSpec] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    tracker: Any = None
    note: str | None = None
    loss_scale: float = 1.0
    """What the loss is multiplied by before backward: ``1/N`` where the comm hook sums the gradients."""

    def backward(self, loss: torch.Tensor) -> None:
        scaled_backward(loss, self.loss_scale)

    @property
    def kinds(self) -> tuple[str, ...]:
        return STRATEGY_KINDS.get(self.effective, ())

    @property
    def has_ddp_buckets(self) -> bool:
        return self.effective in ("ddp", "zero1")

    def no_comm(self) -> AbstractContextManager | None:
        """A context for steps without any communication, or None where no such step exists (fsdp)."""
        if self.effective == "fsdp":
            return None
        if self.effective == "zero1":
            return _without_broadcast(self.model, self.optimizer)
        return self.model.no_sync() if isinstance(self.model, DDP) else nullcontext()

    def stop_memory_tracking(self) -> None:
        if self.tracker is not None:
            self.tracker.active = False

    def memory(self) -> dict[str, int | None]:
        """What this rank holds: its shards under fsdp, its optimizer partition under zero1."""
        module = self.model.module if isinstance(self.model, DDP) else self.model
        state = self.optimizer.optim.state if self.effective == "zero1" else self.optimizer.state
        states = [v for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        if self.effective == "fsdp":
            out = {"params": memory.held_bytes(module.parameters()), "grads": memory.held_bytes(p.grad for p in module.parameters()),
                   "optimizer_state": memory.held_bytes(states),
                   "params_unsharded": self.tracker.unsharded_peak if self.tracker is not None else None}
        else:
            out = {"params": memory.params_bytes(module), "grads": memory.grads_bytes(module),
                   "optimizer_state": memory.tensor_bytes(states), "params_unsharded": None}
        return out

    def memory_model(self, cfg: RunConfig, world_size: int) -> dict[str, Any]:
        strategy = self.effective if self.effective != "none" else "ddp"
        return predict(strategy, world_size, self.specs, cfg.optim.name, cfg.optim.momentum, cfg.train.amp,
                       cfg.dist.fsdp.reshard_after_forward)

    def record(self) -> dict[str, Any]:
        """What run.json says of the strategy."""
        out: dict[str, Any] = {"strategy": self.requested, "strategy_effective": self.effective}
        if self.note:
            out["strategy_note"] = self.note
        if self.effective == "fsdp":
            out["fsdp"] = {"blocks": self.blocks, "root_params": sum(s.block is None for s in self.specs)}
        return out


class _without_broadcast:
    """DDP's no_sync and no ZeRO broadcast: steps with no communication at all."""

    def __init__(self, model: DDP, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer
        self._no_sync = model.no_sync()

    def __enter__(self) -> None:
        self.optimizer.broadcasting = False
        self._no_sync.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._no_sync.__exit__(*exc)
        self.optimizer.broadcasting = True


def build(module: nn.Module, cfg: RunConfig, hook: hooks.HookChoice, ctx: Context, comm: CommTimer,
          instrumented: bool) -> Parallel:
    """Wrap ``module`` (already on the device) for ``dist.strategy``; build its optimizer."""
    requested = cfg.dist.strategy
    blocks = fsdp_blocks(module) if requested == "fsdp" else []
    specs = param_specs(module, blocks)
    if ctx.world_size == 1:
        return Parallel(requested, "none", module, make_optimizer(cfg.optim, module.parameters()), specs=specs,
                        note=f"world size 1: no peer, the model trains unwrapped; dist.strategy={requested} "
                             "has no effect")
    comm.kinds = STRATEGY_KINDS[requested]
    if requested == "fsdp":
        return _fsdp(module, cfg, ctx, comm, instrumented, blocks, specs)
    # DDP broadcasts buffers (batch-norm statistics) from rank 0 before every
    # forward, a collective no hook sees. Instrumented, the loop does that
    # broadcast itself, timed as comm_sync_s.
    sync_buffers = instrumented and any(True for _ in module.buffers())
    model = DDP(module, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                bucket_cap_mb=cfg.dist.bucket_cap_mb, gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view,
                **compat.ddp_buffer_sync(not sync_buffers))
    state = hooks.make_state(hook, cfg.comm)
    loss_scale = 1.0
    if instrumented and hook.builtin_reducer:
        # Summed buckets, the mean's 1/N in the loss: no pass over the buckets beyond the built-in reducer's.
        model.register_comm_hook(state, comm.timed_sum_allreduce())
        loss_scale = 1.0 / ctx.world_size
    elif instrumented:
        model.register_comm_hook(state, comm.wrap(hook.hook, wire_count(hook.name)))
    elif not hook.builtin_reducer:
        model.register_comm_hook(state, hook.hook)
    if requested == "zero1":
        from scaling.instruments.sharded import TimedZeroRedundancyOptimizer

        cls, kwargs = optimizer_class(cfg.optim)
        optimizer: torch.optim.Optimizer = TimedZeroRedundancyOptimizer(model.parameters(), cls, comm if instrumented else None,
                                                           **kwargs)
    else:
        optimizer = make_optimizer(cfg.optim, model.parameters())
    return Parallel(requested, requested, model, optimizer, sync_buffers=sync_buffers, specs=specs,
                    loss_scale=loss_scale)


def _fsdp(module: nn.Module, cfg: RunConfig, ctx: Context, comm: CommTimer, instrumented: bool,
          blocks: list[tuple[str, nn.Module]], specs: list[ParamSpec]) -> Parallel:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from scaling.instruments.sharded import GatherTracker, TimedAllGather, TimedReduceScatter, time_compute_waits

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.train.amp == "bf16" else MixedPrecisionPolicy())
    for _, block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=cfg.dist.fsdp.reshard_after_forward, mp_policy=policy)
    # The root's parameters are needed again as soon as backward starts: never resharded after forward.
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    tracker = None
    if instrumented:
        tracker = GatherTracker(module)
        tracker.active = cfg.instrument.memory
        for sharded in module.modules():
            if isinstance(sharded, FSDPModule):
                sharded.set_custom_all_gather(TimedAllGather(comm, tracker))
                sharded.set_custom_reduce_scatter(TimedReduceScatter(comm, tracker))
        if ctx.device.type == "cuda":
            time_compute_waits(module, comm)
    optimizer = make_optimizer(cfg.optim, module.parameters())
    return Parallel("fsdp", "fsdp", module, optimizer, specs=specs, blocks=[name for name, _ in blocks],
                    tracker=tracker, note=NO_CONTROLS_FSDP if cfg.instrument.control_steps else None)


def broadcast_buffers(buffers: list[torch.Tensor]) -> None:
    """What DDP's broadcast_buffers does: rank 0's buffers to every rank, one flat tensor per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in buffers:
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for group in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in group])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for buffer in group:
            buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()
