"""Predicted model-state bytes per rank for a strategy, a model, an optimizer and a world size.

run.json ``memory_model``, beside the measured ``memory``. Per rank: ``params``,
``grads``, ``optimizer_state``, their sum ``model_state``, and (fsdp)
``params_unsharded``: the parameter bytes gathered at once.

Bytes per element follow what the job holds (the rules memory.py measures):
parameters and gradients in the parameters' dtype (fp32; ``train.amp=bf16`` is
autocast and keeps them fp32); optimizer state: SGD one momentum buffer of the
parameter's dtype when ``optim.momentum > 0`` (none otherwise), AdamW two
(``exp_avg``, ``exp_avg_sq``) plus a 4-byte ``step`` per parameter tensor.
Under fsdp with bf16 the gathered parameters are bf16 (FSDP's
MixedPrecisionPolicy), 2 bytes per element.

- ddp: everything replicated.
- zero1: parameters and gradients replicated; the optimizer state of the rank's
  partition. ZeroRedundancyOptimizer partitions whole tensors, largest first,
  each to the rank with the fewest elements so far: with few large tensors a
  rank may hold well over 1/N.
- fsdp: every tensor split on dim 0 into N chunks of ceil(d0/N) rows (padded:
  each rank allocates a full chunk for parameters and gradients; the optimizer
  state follows the unpadded chunk, torch.chunk's split), plus the gathered
  parameters: the root's (kept from forward through backward) and, with
  ``reshard_after_forward``, the two largest consecutive blocks (backward
  holds the block it differentiates and prefetches the one before it), or
  every block without it.

``textbook_model_state``: the same bytes per element with the 1/N of ZeRO's
paper (DDP (p+g+o)Ψ, ZeRO-1 (p+g)Ψ + oΨ/N, FSDP (p+g+o)Ψ/N; for Adam in mixed
precision p=g=2, o=12: 16Ψ, 4Ψ+12Ψ/N, 16Ψ/N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scaling.records.schema import MODEL_STATE_KEYS

ADAM_STEP_BYTES = 4
"""AdamW's ``step`` is a float32 scalar tensor per parameter tensor."""


@dataclass(frozen=True)
class ParamSpec:
    numel: int
    dim0: int
    element_size: int
    block: int | None
    """The FSDP block it belongs to, in forward order; None: the root's own."""


@dataclass(frozen=True)
class OptimizerRule:
    buffers: int
    """State tensors of the parameter's shape and dtype per parameter."""
    per_tensor_bytes: int
    """Bytes more per parameter tensor (AdamW's step)."""

    def bytes(self, numel: int, element_size: int) -> int:
        return self.buffers * numel * element_size + self.per_tensor_bytes


def optimizer_rule(name: str, momentum: float) -> OptimizerRule:
    if name == "adamw":
        return OptimizerRule(2, ADAM_STEP_BYTES)
    return OptimizerRule(1 if momentum > 0 else 0, 0)


def chunk_rows(dim0: int, world_size: int, rank: int) -> int:
    """Rows of rank ``rank``'s chunk under torch.chunk (what FSDP's dim-0 sharding uses)."""
    size = -(-dim0 // world_size)
    return max(0, min(size, dim0 - rank * size))


def padded_rows(dim0: int, world_size: int) -> int:
    return -(-dim0 // world_size)


def shard_numel(spec: ParamSpec, world_size: int) -> int:
    """Elements of one rank's FSDP shard of a parameter: dim 0 split evenly, padded up."""
    return padded_rows(spec.dim0, world_size) * (spec.numel // max(spec.dim0, 1))


def zero_partition(specs: list[ParamSpec], world_size: int) -> list[list[int]]:
    """Indices of the tensors each rank owns: largest first, each to the rank with the fewest elements."""
    sizes = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(specs)), key=lambda i: -specs[i].numel):
        rank = sizes.index(min(sizes))
        owned[rank].append(i)
        sizes[rank] += specs[i].numel
    return owned


def gathered_bytes(specs: list[ParamSpec], world_size: int, gather_element_size: int,
                   reshard_after_forward: bool) -> int:
    """The most parameter bytes FSDP holds gathered at once (dim-0 padding included)."""
    def unit(block: int | None) -> int:
        return sum(shard_numel(s, world_size) * world_size * gather_element_size for s in specs if s.block == block)

    blocks = sorted({s.block for s in specs if s.block is not None})
    sizes = [unit(b) for b in blocks]
    if not reshard_after_forward:
        held = sum(sizes)
    else:
        held = max([a + b for a, b in zip(sizes, sizes[1:])] or sizes or [0])
    return unit(None) + held


def predict(strategy: str, world_size: int, specs: list[ParamSpec], optimizer: str, momentum: float,
            amp: str, reshard_after_forward: bool = True) -> dict[str, Any]:
    rule = optimizer_rule(optimizer, momentum)
    n = world_size
    per_rank = []
    owned = zero_partition(specs, n) if strategy == "zero1" else None
    for rank in range(n):
        if strategy == "fsdp":
            shard = [shard_numel(s, n) * s.element_size for s in specs]
            params = grads = sum(shard)
            optimizer_state = sum(rule.bytes(chunk_rows(s.dim0, n, rank) * (s.numel // max(s.dim0, 1)), s.element_size)
                                  for s in specs)
        else:
            params = grads = sum(s.numel * s.element_size for s in specs)
            mine = owned[rank] if owned is not None else range(len(specs))
            optimizer_state = sum(rule.bytes(specs[i].numel, specs[i].element_size) for i in mine)
        row = {"params": params, "grads": grads, "optimizer_state": optimizer_state}
        row["model_state"] = sum(row[k] for k in MODEL_STATE_KEYS)
        row["params_unsharded"] = (gathered_bytes(specs, n, 2 if amp == "bf16" else specs[0].element_size,
                                                  reshard_after_forward) if strategy == "fsdp" and specs else None)
        per_rank.append(row)
    psi = sum(s.numel for s in specs)
    element = specs[0].element_size if specs else 4
    p = g = psi * element
    o = rule.buffers * psi * element
    textbook = {"fsdp": (p + g + o) / n, "zero1": p + g + o / n}.get(strategy, p + g + o)
    return {
        "strategy": strategy,
        "world_size": n,
        "params_count": psi,
        "param_tensors": len(specs),
        "optimizer": optimizer,
        "bytes_per_element": {"params": element, "grads": element, "optimizer_state": rule.buffers * element},
        "per_rank": per_rank,
        "max": {k: (max(r[k] for r in per_rank) if per_rank[0][k] is not None else None) for k in per_rank[0]},
        "textbook_model_state": int(textbook),
        "ddp_model_state": int(p + g + sum(rule.bytes(s.numel, s.element_size) for s in specs)),
    }
