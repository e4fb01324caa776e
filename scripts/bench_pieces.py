"""What each piece of the measuring costs, paired inside one process pair.

``bench_overhead.py`` compares whole jobs, one after another: on a small shared
machine their throughput spreads by several percent from run to run, more than
the cost being looked for. Here every variant is its own DDP copy of resnet18 in
the same two processes, and the variants take turns step by step (the order
reversed on every other round), so that a drift of the machine hits them alike.
Each step starts at a barrier; the median step time of each variant is compared
with DDP's built-in reducer:

  builtin   DDP with PyTorch's defaults (its C++ all-reduce, its own buffer broadcast)
  hook      the framework's timed all-reduce hook for comm.hook=allreduce: each bucket
            summed, its launch and completion stamped, the mean's 1/N folded into the loss
  wrapped   the timing wrapper the framework puts around any other hook, here around
            PyTorch's ``allreduce_hook`` (which divides each bucket in a pass of its own)
  buffers   the loop's own buffer broadcast before forward (DDP's switched off)
  all       hook and buffers, and the step timer's phase marks: the instrumented step

    torchrun --standalone --nproc_per_node=2 scripts/bench_pieces.py [--steps 150] [--variants builtin,hook,...]

The loop's bookkeeping (progress, the gather and the records at each log
interval) is not here: the job measures it itself as ``other_s``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling.instruments.clock import HostClock
from scaling.instruments.comm import CommTimer, wire_count
from scaling.instruments.timing import StepTimer
from scaling.compat import ddp_buffer_sync
from scaling.train.strategy import broadcast_buffers, scaled_backward

VARIANTS = ("builtin", "hook", "wrapped", "buffers", "all")
WARMUP = 5


class Variant:
    def __init__(self, name: str, world: int) -> None:
        torch.manual_seed(0)
        timed_buffers = name in ("buffers", "all")
        self.name = name
        self.model = DDP(torchvision.models.resnet18(weights=None, num_classes=10),
                         **ddp_buffer_sync(not timed_buffers))
        self.buffers = list(self.model.module.buffers()) if timed_buffers else []
        self.clock = HostClock()
        self.comm: CommTimer | None = None
        self.loss_scale = 1.0
        if name in ("hook", "all"):
            self.comm = CommTimer(self.clock, world)
            self.model.register_comm_hook(None, self.comm.timed_sum_allreduce())
            self.loss_scale = 1.0 / world
        elif name == "wrapped":
            self.comm = CommTimer(self.clock, world)
            self.model.register_comm_hook(None, self.comm.wrap(default_hooks.allreduce_hook, wire_count("allreduce")))
        self.timer = StepTimer(self.clock) if name == "all" else None
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.seconds: list[float] = []

    def mark(self, phase: str) -> None:
        if self.timer is not None:
            self.timer.mark(phase)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dist.barrier()
        start = time.perf_counter()
        if self.timer is not None:
            self.timer.restart()
        self.mark("data")
        if self.buffers:
            if self.comm is not None:
                self.comm.sync(lambda: broadcast_buffers(self.buffers))
            else:
                broadcast_buffers(self.buffers)
        loss = F.cross_entropy(self.model(x), y)
        self.mark("forward")
        if self.comm is not None:
            self.comm.begin_backward(self.clock.mark())
        scaled_backward(loss, self.loss_scale)
        self.mark("backward")
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.mark("optimizer")
        taken: Any = self.comm.take_step() if self.comm is not None else None
        if self.timer is not None:
            self.timer.mark("other")
            self.timer.resolve(self.timer.finish())
        self.seconds.append(time.perf_counter() - start)
        if taken is not None:
            self.comm.resolve(taken)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="measured steps per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or names[0] != "builtin":
        parser.error(f"--variants: the first must be builtin, the others of {', '.join(VARIANTS)}")
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    variants = [Variant(name, dist.get_world_size()) for name in names]
    for round_ in range(WARMUP + args.steps):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            variant.step(x, y)
    if dist.get_rank() == 0:
        base = statistics.median(variants[0].seconds[WARMUP:])
        print(f"resnet18, batch 32 per rank, {dist.get_world_size()} processes, gloo; median of {args.steps} "
              f"paired steps")
        for variant in variants:
            median = statistics.median(variant.seconds[WARMUP:])
            print(f"  {variant.name:8s} {median * 1e3:8.2f} ms   builtin / this {base / median:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
