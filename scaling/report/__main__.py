"""Command line of ``python -m scaling.report``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from scaling.report import build_report, console_text, inference
from scaling.report import sweep_report
from scaling.report.commbench_share import CommbenchError
from scaling.report.prediction import PredictError, PredictRequest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scaling.report",
        description="Tables, plots and a comparison report from the records of one or more studies.")
    parser.add_argument("studies", nargs="+", type=Path, metavar="STUDY_DIR",
                        help="a study folder, <paths.root>/<study.name>; several are compared; or a sweep folder (-m)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (default: the study folder; for several, compare-<a>-vs-<b> beside the first)")
    parser.add_argument("--commbench", type=Path, action="append", default=[], metavar="PATH",
                        help="a commbench.json or its run folder (repeatable): each world size's all-reduce bus "
                             "bandwidth is set beside the commbench result of the same world size and backend")
    parser.add_argument("--against", type=Path, default=None, metavar="REF",
                        help="compare STUDY_DIR (a study, a train sweep or a run folder) with REF: per point and "
                             "metric the change, its interval and a verdict (regressed / improved / within noise)")
    parser.add_argument("--fail-on", action="append", default=[], metavar="METRIC:PCT",
                        help="with --against (repeatable, e.g. step_s:5%%): exit 1 when METRIC regressed by more "
                             "than PCT beyond the noise (metrics: step_s, samples_per_s, speedup, efficiency, "
                             "busbw_GBps)")
    parser.add_argument("--wandb", action="store_true", help="also publish the report to Weights & Biases")
    parser.add_argument("--predict", default=None, metavar="NPROCS",
                        help="also predict these world sizes (e.g. 8,16,64) with scaling.predict; a Prediction section")
    parser.add_argument("--predict-link", default=None, metavar="RATE[,LATENCY]",
                        help="with --predict: the link to predict on (default: fitted on the runs' buckets)")
    return parser.parse_args(argv)


def publish_wandb(report) -> int:
    try:
        wandb_report = importlib.import_module("scaling.report.wandb_publish")
    except ImportError as exc:
        print(f"wandb support is not installed ({exc}); the local report is complete", file=sys.stderr)
        return 0
    wandb_report.publish(study_dirs=[st.records.folder for st in report.studies], out_dir=report.out_dir,
                         results_csv=report.out_dir / "results.csv", plots=report.document.plots,
                         rows=report.rows)
    return 0


def against(args: argparse.Namespace) -> int:
    from scaling.report import compare

    if len(args.studies) != 1:
        print("scaling.report: error: --against compares one folder (NEW) with REF; "
              f"{len(args.studies)} were given", file=sys.stderr)
        return 2
    try:
        return compare.main(args.studies[0], args.against, args.fail_on)
    except compare.UsageError as exc:
        print(f"scaling.report: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.against is not None:
        return against(args)
    if args.fail_on:
        print("scaling.report: error: --fail-on needs --against REF", file=sys.stderr)
        return 2
    for folder in args.studies:
        if not folder.is_dir():
            print(f"scaling.report: error: {folder} is not a directory (expected <paths.root>/<study.name>)",
                  file=sys.stderr)
            return 2
    if all(inference.is_inference(folder) for folder in args.studies):  # python -m scaling.infer records
        print(inference.render(args.studies, args.out))
        return 0
    if len(args.studies) == 1 and sweep_report.is_sweep(args.studies[0]):  # a folder of python -m ... -m
        folder = args.studies[0]
        if sweep_report.command(folder) == "train":
            print(sweep_report.console_text(sweep_report.build(folder)))
            return 0
        args.studies, args.out = sweep_report.study_folders(folder), args.out or folder / "compare"
    try:
        predict = PredictRequest.parse(args.predict, args.predict_link) if args.predict else None
        report = build_report(args.studies, args.out, args.commbench, predict)
    except CommbenchError as exc:
        print(f"scaling.report: error: {exc}", file=sys.stderr)
        return 2
    except PredictError as exc:
        print(f"scaling.report: error: --predict: {exc}", file=sys.stderr)
        return 2
    if not any(st.records.runs for st in report.studies):
        print(console_text(report))
        print(f"scaling.report: error: no run records (run.json) in {', '.join(map(str, args.studies))}",
              file=sys.stderr)
        return 1
    print(console_text(report))
    if report.prediction is not None:
        print("\n" + report.prediction.text)
    if args.wandb:
        return publish_wandb(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
