"""The same small study run again, and again with a known slowdown: what does ``--against`` call them?

    python scripts/noise_compare.py [--rounds 10] [--root runs/noise-compare]

Each round makes three "studies" of 2-process runs, as tests/test_noise.py does: REF and AGAIN (the same
job), ``--repeats`` runs each, and SLOW (60 ms slept in every rank's forward), 2 runs; two jobs at a time
(REF beside AGAIN, then SLOW beside SLOW), so the machine's load falls alike on the sides compared. It prints, per round, the change of
step_s, samples_per_s and busbw_GBps of AGAIN against REF and of SLOW against REF, with interval and
verdict, then the spread over the rounds. The folders stay under ``--root`` for a second look.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scaling.report import compare  # noqa: E402

JOB = ["+exp=mlp", "model.hidden=256", "model.in_features=64", "model.layers=2", "train.batch_size=4",
       "data.num_samples=256", "logger.wandb.mode=disabled", "train.steps=12", "train.warmup_steps=2",
       "train.log_every=6", "instrument.flops=false", "instrument.ops=false", "instrument.memory=false",
       "instrument.control_steps=0"]
SLOWDOWN = "forward:0.060"
METRICS = ("step_s", "samples_per_s", "busbw_GBps")


def launch(root: Path, name: str) -> None:
    study = name.rstrip("0123456789")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if study == "slow":
        env["SCALING_INJECT_STALL"] = SLOWDOWN
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scaling.train", *JOB, f"paths.root={root}", f"study.name={study}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")


def changes(new: Path, ref: Path) -> dict[str, compare.Change]:
    (point,) = compare.compare(new, ref).points
    return {c.metric.key: c for c in point.changes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4, help="runs of REF and of AGAIN per round")
    parser.add_argument("--root", type=Path, default=Path("runs/noise-compare"))
    args = parser.parse_args()
    seen: dict[str, list[float]] = {}
    wrong = 0
    for i in range(args.rounds):
        root = args.root / f"round-{i}"
        with ThreadPoolExecutor(max_workers=2) as pool:
            for pair in (*((f"ref{i}", f"again{i}") for i in range(args.repeats)), ("slow0", "slow1")):
                list(pool.map(lambda n: launch(root, n), pair))
        again, slow = changes(root / "again", root / "ref"), changes(root / "slow", root / "ref")
        cells = []
        for side, result in (("again", again), ("slow", slow)):
            for key in METRICS:
                c = result.get(key)
                if c is None:
                    continue
                r = c.relative
                seen.setdefault(f"{side} {key}", []).append(r.value)
                cells.append(f"{side} {key} {100 * r.value:+.1f}% [{100 * r.low:+.1f}, {100 * r.high:+.1f}] "
                             f"{c.verdict}")
        bad = any(c.verdict != "within noise" for c in again.values()) or slow["step_s"].verdict != "regressed"
        wrong += bad
        print(f"round {i}: " + "; ".join(cells) + ("  <- WRONG" if bad else ""), flush=True)
    for name, values in seen.items():
        print(f"{name}: {100 * min(values):+.1f}% to {100 * max(values):+.1f}% over {len(values)} rounds")
    print(f"{wrong} of {args.rounds} rounds had a wrong verdict (AGAIN not within noise, or SLOW not regressed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
