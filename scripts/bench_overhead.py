"""What does measuring cost? Throughput of the 2-process resnet job, side by side.

Runs, interleaved over several repeats so that drifts in machine load hit all
variants alike:
  instrumented  the job as users run it (every instrument on)
  bare          the same job with instrument.enabled=false (a per-step wall clock only)
  plain         the same training written as a plain torchrun DDP loop with PyTorch's
                default DDP settings (scripts/plain_ddp.py)
  constant      that plain loop training on one constant batch (no loader at all)

Throughput is global samples over the wall time of the measured steps (the
loop's own clock, start-up excluded). Prints the medians and the ratios with
their targets: instrumented >= 0.99 x bare, framework >= 0.98 x plain.
The constant-batch loop shows what the data loader itself costs.

    python scripts/bench_overhead.py [--repeats 3] [--steps 30] [--variants instrumented,bare] [OVERRIDE ...]

Extra Hydra overrides go to both framework variants (e.g. dist.gradient_as_bucket_view=true,
to measure a default against its alternative).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def torchrun(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


OTHER_FRACS: list[float] = []  # the instrumented runs' own measure of the loop's bookkeeping


def framework(root: Path, name: str, steps: int, instrumented: bool, overrides: list[str]) -> float:
    torchrun(["-m", "scaling.train", "+exp=resnet", f"train.steps={steps}", "train.warmup_steps=3",
              f"instrument.enabled={str(instrumented).lower()}", "logger.wandb.mode=disabled",
              f"paths.root={root}", f"study.name={name}", *overrides])
    run = json.loads(next((root / name).glob("*/run.json")).read_text())
    if instrumented:
        OTHER_FRACS.append(run["summary"]["other_frac"])
    return run["summary"]["wall_samples_per_s"]


def plain(root: Path, name: str, steps: int, constant: bool = False) -> float:
    out = root / f"{name}.json"
    torchrun([str(REPO / "scripts" / "plain_ddp.py"), str(out), str(steps), "3", *(["--constant-batch"] if constant else [])])
    return json.loads(out.read_text())["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default="instrumented,bare,plain,constant",
                        help="comma-separated subset of instrumented,bare,plain,constant")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the framework variants")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        variants = {
            "instrumented": lambda r: framework(root, f"inst{r}", args.steps, True, args.overrides),
            "bare": lambda r: framework(root, f"bare{r}", args.steps, False, args.overrides),
            "plain": lambda r: plain(root, f"plain{r}", args.steps),
            "constant": lambda r: plain(root, f"const{r}", args.steps, constant=True),
        }
        names = [n for n in variants if n in args.variants.split(",")]
        results: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.repeats):
            # A different variant goes first in each repeat, so no variant always runs on a cold machine.
            for name in names[r % len(names):] + names[:r % len(names)]:
                results[name].append(variants[name](r))
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print("\nresnet18, 2 processes x 1 thread, gloo, batch 32 per rank; samples/s (median of "
          f"{args.repeats}, {args.steps} measured steps each)")
    for k, v in results.items():
        print(f"  {k:<13} {med[k]:8.1f}   runs: {', '.join(f'{x:.1f}' for x in v)}")
    spread = max(max(v) / min(v) for v in results.values()) - 1
    print(f"\n  run-to-run spread of one variant: up to {100 * spread:.0f}% (machine noise)")
    if OTHER_FRACS:
        print(f"  framework overhead inside the step (other_s share, instrumented): "
              f"median {100 * statistics.median(OTHER_FRACS):.3f}%")
    pairs = [("instrumented", "bare", 0.99), ("instrumented", "plain", 0.98), ("bare", "plain", 0.98),
             ("instrumented", "constant", 0.0)]
    print("\n  ratio                  of medians   median of paired runs   target")
    for a, b, target in [p for p in pairs if p[0] in results and p[1] in results]:
        ratio = med[a] / med[b]
        # Runs of one repeat ran back to back: their ratio cancels slow drifts in machine load.
        paired = statistics.median(x / y for x, y in zip(results[a], results[b]))
        verdict = "(no target)" if not target else "ok" if min(ratio, paired) >= target else "MISSED"
        print(f"  {a + ' / ' + b:<22} {ratio:10.3f}   {paired:20.3f}   >= {target:.2f}  {verdict}")
    if spread > 0.03:
        print(f"\n  One variant's runs spread by {100 * spread:.0f}%: these whole-job ratios cannot resolve the 1-2 % the\n"
              "  targets are about on this machine now. The pieces of the measuring, paired inside one process pair:\n"
              "    torchrun --standalone --nproc_per_node=2 scripts/bench_pieces.py")


if __name__ == "__main__":
    main()
