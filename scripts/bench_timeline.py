"""What does timeline.json cost? The same 2-process job with instrument.timeline_steps=0 and =4, interleaved.

Per pair: the measured steps' throughput (``wall_samples_per_s``, the loop's own clock: the trace must add
nothing to a measured step), the whole job's wall time as the shell sees it (start-up, the alignment barriers,
the gathers and the write included), and, from the trace itself, the seconds rank 0 spent in the alignments and
the gather (``otherData.cost_s``) and the file's size. Prints the medians over pairs of the ratios (with / without).

    python scripts/bench_timeline.py [--repeats 3] [--steps 20] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOB = ["+exp=resnet", "data.image_size=32", "train.batch_size=8", "train.warmup_steps=3", "instrument.flops=false",
       "instrument.ops=false", "instrument.control_steps=0", "logger.wandb.mode=disabled"]


def run(root: Path, name: str, steps: int, timeline: int, overrides: list[str]) -> tuple[dict, float, Path]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scaling.train",
           *JOB, f"train.steps={steps}", f"instrument.timeline_steps={timeline}", f"paths.root={root}",
           f"study.name={name}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    folder = next((root / name).iterdir())
    return json.loads((folder / "run.json").read_text()), wall, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args, overrides = parser.parse_known_args()
    throughput, walls, costs, sizes = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            pair = {}
            for timeline in ((0, 4) if i % 2 == 0 else (4, 0)):  # alternate the order: drifts fall on both
                pair[timeline] = run(Path(tmp), f"t{timeline}-{i}", args.steps, timeline, overrides)
            (off, off_wall, _), (on, on_wall, folder) = pair[0], pair[4]
            throughput.append(on["summary"]["wall_samples_per_s"] / off["summary"]["wall_samples_per_s"])
            walls.append(on_wall / off_wall)
            trace = json.loads((folder / "timeline.json").read_text())
            costs.append(sum(trace["otherData"]["cost_s"].values()))
            sizes.append((folder / "timeline.json").stat().st_size)
            print(f"pair {i}: measured-step throughput with/without {throughput[-1]:.3f}, job wall time "
                  f"{on_wall:.2f} s / {off_wall:.2f} s = {walls[-1]:.3f}, rank 0 in alignments and gather "
                  f"{1e3 * costs[-1]:.1f} ms ({trace['otherData']['cost_s']}), timeline.json {sizes[-1]} B", flush=True)
    print(f"median over {args.repeats} pairs: throughput ratio {statistics.median(throughput):.3f}, job wall-time "
          f"ratio {statistics.median(walls):.3f}, alignment + gather {1e3 * statistics.median(costs):.1f} ms, "
          f"file {statistics.median(sizes):.0f} B")


if __name__ == "__main__":
    main()
