"""``python -m tests.taps [overrides]``: ``scaling.train`` as it is, with two taps that write what they see.

The job runs unchanged (the same hook, chosen by ``comm.hook``, the same
autocast); the taps only look, and write under ``SCALING_TEST_TAP_DIR``:

- ``rank{R}.bucket{I}.pt``: for one step (``SCALING_TEST_TAP_STEP``, default 0),
  each gradient bucket as this rank computed it (``local``: as handed to the comm
  hook, times N where the job folded the mean's 1/N into the loss), what
  the hook made of it (``reduced``), and the shapes of the parameters in it.
  Taken around whatever hook the job registers with DDP, so around the timed one.
- ``rank{R}.dtypes.json``: per module class (Linear, Conv2d), how many forward
  outputs of each dtype the job produced, FLOP counting and control steps included.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
from collections import Counter
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

TAPPED_MODULES = (torch.nn.Linear, torch.nn.Conv2d)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def tap_buckets(out: Path, target_step: int) -> None:
    register = DistributedDataParallel.register_comm_hook
    steps = {"n": 0}

    def register_tapped(self, state, hook):
        def tapped(state, bucket):
            step = steps["n"]
            if bucket.is_last():
                steps["n"] += 1
            if step != target_step:
                return hook(state, bucket)
            index = bucket.index()
            local = bucket.buffer().detach().clone()
            if getattr(hook, "__name__", "") == "timed_sum_allreduce":
                # Its buckets hold the gradients of loss / N (the job folds the mean's 1/N into the loss):
                # the rank's own gradient is N times that, exactly for N a power of two.
                local *= torch.distributed.get_world_size()
            shapes = [tuple(p.shape) for p in bucket.parameters()]

            def seen(fut):
                value = fut.value()
                reduced = value if isinstance(value, torch.Tensor) else value[0]
                torch.save({"index": index, "shapes": shapes, "local": local, "reduced": reduced.detach().clone()},
                           out / f"rank{_rank()}.bucket{index}.pt")
                return value

            return hook(state, bucket).then(seen)

        return register(self, state, tapped)

    DistributedDataParallel.register_comm_hook = register_tapped


def tap_dtypes(out: Path) -> None:
    seen: dict[str, Counter] = {}

    def forward_hook(module, inputs, output):
        # Tensors on the meta device belong to the FLOP count (shapes only), not to training.
        if isinstance(module, TAPPED_MODULES) and isinstance(output, torch.Tensor) and output.device.type != "meta":
            seen.setdefault(type(module).__name__, Counter())[str(output.dtype)] += 1

    torch.nn.modules.module.register_module_forward_hook(forward_hook)
    atexit.register(lambda: (out / f"rank{_rank()}.dtypes.json").write_text(json.dumps(seen)))


def main() -> None:
    out = Path(os.environ["SCALING_TEST_TAP_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    tap_buckets(out, int(os.environ.get("SCALING_TEST_TAP_STEP", "0")))
    tap_dtypes(out)
    runpy.run_module("scaling.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
