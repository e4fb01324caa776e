"""The resnet experiment written as a plain torchrun DDP loop, without the framework.

The reference for ``bench_overhead.py``: same model, data, sampler, optimizer and
batch as ``+exp=resnet``, and DDP with PyTorch's default settings (what a user
who writes their own loop gets). With ``--constant-batch`` every step trains on
the first batch again: no loader at all, the fastest the training itself can
go. Rank 0 writes the wall time of the measured steps to the JSON file given as
its argument.

    torchrun --standalone --nproc_per_node=2 scripts/plain_ddp.py out.json [steps] [warmup] [--constant-batch]
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main() -> None:
    constant = "--constant-batch" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--constant-batch"]
    out, steps, warmup = args[0], int(args[1]) if len(args) > 1 else 30, int(args[2]) if len(args) > 2 else 3
    batch = 32
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(2048, 3, 32, 32, generator=gen), torch.randint(0, 10, (2048,), generator=gen))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True)
    torch.manual_seed(0)
    model = DDP(torchvision.models.resnet18(weights=None, num_classes=10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    epoch, it = 0, iter(loader)
    first = next(iter(loader))
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        if constant:
            x, y = first
        else:
            try:
                x, y = next(it)
            except StopIteration:
                epoch += 1
                sampler.set_epoch(epoch)
                it = iter(loader)
                x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    wall = time.perf_counter() - start
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"measured_wall_s": wall, "samples_per_s": batch * world * steps / wall}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
