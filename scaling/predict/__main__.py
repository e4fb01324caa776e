"""``python -m scaling.predict RUNS [--nprocs 4,8,…] [--commbench PATH ... | --link RATE[,LATENCY]] [...]``.

Predicts ``step_s``, its parts, efficiency and ``bound`` at other world sizes, links, bucket
sizes or hooks from measured runs; writes ``prediction.json`` and ``prediction.png`` beside the
inputs (the study folder) and prints a table with the model's assumptions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scaling.predict.report import PredictOptions, parse_latency_s, parse_rate_bit_s, run_prediction


def parse_nprocs(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nprocs {text!r}: give world sizes separated by commas, e.g. 4,8,16")
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"--nprocs {text!r}: world sizes must be >= 1")
    return values


def parse_link(text: str) -> tuple[float | None, float | None]:
    rate, _, latency = text.partition(",")
    try:
        return parse_rate_bit_s(rate), (parse_latency_s(latency) if latency else None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--link {text!r}: {exc}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scaling.predict",
                                     description="Predict scaling from measured runs (a bucket-pipeline model with "
                                                 "an alpha/beta all-reduce cost).")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUNS", help="run folders or study folders")
    parser.add_argument("--nprocs", type=parse_nprocs, default=None,
                        help="world sizes to predict (default: 1, 2, 4, ... up to 8x the largest measured)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--commbench", type=Path, metavar="PATH", action="append",
                        help="commbench.json, its run folder, or a folder of commbench runs: the all-reduce alpha "
                             "and bandwidth of each world size's fit (repeatable; a world size not measured is "
                             "priced with the nearest one's)")
    source.add_argument("--link", type=parse_link, metavar="RATE[,LATENCY]",
                        help="link rate per direction (e.g. 100mbit, 10gbit, unlimited) and optionally the latency "
                             "per ring step (e.g. 50us); without a latency, the one fitted on the runs")
    parser.add_argument("--measured-link", type=lambda t: parse_link(t)[0], metavar="RATE", default=None,
                        help="the link rate the runs were measured on: the share of it they achieved is carried to "
                             "--link")
    parser.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP's bucket_cap_mb to predict")
    parser.add_argument("--hook", choices=("allreduce", "fp16", "bf16"), default=None, help="the comm hook to predict")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="strong scaling at this global batch (default: the runs' study kind decides)")
    parser.add_argument("--out", type=Path, default=None, help="folder for prediction.json/png (default: beside RUNS)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = PredictOptions(runs=args.runs, nprocs=args.nprocs, commbench=args.commbench,
                             link_bit_s=args.link[0] if args.link else None,
                             link_latency_s=args.link[1] if args.link else None,
                             link_given=args.link is not None, measured_link_bit_s=args.measured_link,
                             bucket_cap_mb=args.bucket_cap_mb, hook=args.hook, global_batch=args.global_batch,
                             out=args.out)
    try:
        result = run_prediction(options)
    except ValueError as exc:
        print(f"scaling.predict: error: {exc}", file=sys.stderr)
        return 2
    print(result.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
