"""The main job, run again and again with nothing injected: does any run name a straggler?

    python scripts/noise_main_job.py [--runs 10] [--root runs/noise-main]

Runs the README's main study (resnet, strong scaling, 1 and 2 processes, global batch 32, 10 measured
steps after 2 warm-up) ``--runs`` times, each as its own study, and prints per run the verdict at 2
processes, whether the waiting was a straggler or skew, the last arrivals by rank and the test's p-value,
then how many runs named a straggler. On an idle machine that count should be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MAIN_JOB = ["+exp=resnet", "study=strong", "study.nprocs=[1,2]", "train.global_batch_size=32", "train.steps=10",
            "train.warmup_steps=2", "logger.wandb.mode=disabled"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--root", type=Path, default=Path("runs/noise-main"))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    named = 0
    for i in range(args.runs):
        study = f"main-{i}"
        subprocess.run([sys.executable, "-m", "scaling.study", *MAIN_JOB, f"paths.root={args.root}",
                        f"study.name={study}"], check=True, env=env, capture_output=True)
        for run_json in sorted((args.root / study).glob("n2-*/run.json")):
            s = json.loads(run_json.read_text())["summary"]
            waiting = s.get("waiting") or {}
            lasts = "/".join(str(r["last"]) for r in waiting.get("ranks", []))
            named += s.get("straggler") is not None
            print(f"{study}: bound {s['bound']}, waiting {waiting.get('kind')}, last arrivals {lasts}, "
                  f"p {waiting.get('p_value', float('nan')):.2g}, explained {waiting.get('explained', 0):.0%}")
    print(f"{named} of {args.runs} runs named a straggler")
    return 0


if __name__ == "__main__":
    sys.exit(main())
