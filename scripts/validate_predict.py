#!/usr/bin/env python3
"""Held-out validation of ``scaling.predict`` on the emulated cluster (root: network namespaces).

Runs the ``mlp`` experiment (shrunk: 5 MiB of gradients in two buckets, one sample per rank)
on K emulated hosts joined by tc-shaped links at several rates, fits the predictor on the runs
at one rate and host count only, predicts every other cell (other rates, other host counts),
and prints predicted against measured ``step_s`` and exposed communication with their errors.
The unshaped cells take the link from commbench fits on unshaped links, one at each host count
(the predictor cannot know the speed of an unshaped link from shaped runs, and unshaped, the
"link" is the CPU time of gloo on cores that every emulated host shares: its cost does not follow
the ring model from 2 hosts to 3 or 4, a commbench at each host count measures it in seconds).

    sudo python scripts/validate_predict.py --root /tmp/validate      # about 10 minutes on 2 cores
    sudo python scripts/validate_predict.py --root /tmp/validate --reuse   # predict again from the same runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scaling.predict.events import Link, Links  # noqa: E402
from scaling.predict.model import Target, fit_from_points, predict  # noqa: E402
from scaling.predict.report import commbench_links  # noqa: E402
from scaling.predict.runs import Point, find_points  # noqa: E402

JOB = ["-m", "scaling.train", "+exp=mlp", "model.in_features=2048", "model.hidden=512", "model.layers=2",
       "dist.bucket_cap_mb=1", "train.batch_size=1", "train.warmup_steps=3", "train.log_every=10",
       "instrument.flops=false", "instrument.ops=false", "instrument.control_steps=10", "logger.wandb.mode=disabled"]
STEPS = {"unlimited": 60}
"""Steps per cell: 20 (0.1-1 s each on a shaped link), 60 unshaped (about 20 ms each: 20 would time 0.3 s of a
machine that other jobs share)."""
DISTURBED = 2.0
"""A cell whose no-comm control step is this many times the median of the cells with as many hosts was measured
while other work held the cores: it is measured once more (the same job's compute takes the same time everywhere)."""
COMMBENCH = ["-m", "scaling.commbench", "commbench.ops=[all_reduce]", "commbench.min_bytes=262144",
             "commbench.max_bytes=4194304", "commbench.iters=20", "commbench.warmup_iters=5"]
TOOL = REPO / "scripts" / "netns_cluster.py"


def rate_bit_s(rate: str) -> float | None:
    return None if rate == "unlimited" else float(rate) * 1e6


def cell_name(rate: str, hosts: int) -> str:
    return f"mlp-{rate}-h{hosts}"


def on_cluster(hosts: int, rate: str, args: list[str], log: Path) -> None:
    link = "unlimited" if rate == "unlimited" else f"{rate}mbit"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        code = subprocess.run([sys.executable, str(TOOL), "--hosts", str(hosts), "--rate", link, "--mtu", "9000",
                               "--torchrun", "--", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=600).returncode
    if code != 0:
        raise SystemExit(f"{log}: exit {code}\n{log.read_text()[-3000:]}")


def measure(root: Path, rates: list[str], hosts: list[int], reuse: bool, redo: set[str]) -> None:
    """Every cell not kept (``reuse`` keeps the measured ones except those named in ``redo``) is measured anew."""
    root.mkdir(parents=True, exist_ok=True)
    for rate in rates:
        for k in hosts:
            study = root / cell_name(rate, k)
            if reuse and cell_name(rate, k) not in redo and study.exists() and find_points([study]):
                continue
            measure_cell(root, rate, k)


def measure_cell(root: Path, rate: str, k: int) -> None:
    if rate == "unlimited":
        # The link's input, measured just before the cell: unshaped, both are bound by CPU time
        # on cores that other work shares too, so the two should see the same machine.
        print(f"measuring commbench on {k} unshaped hosts ...", flush=True)
        shutil.rmtree(root / commbench_name(k), ignore_errors=True)
        on_cluster(k, rate, [*COMMBENCH, f"paths.root={root}", f"study.name={commbench_name(k)}"],
                   root / f"{commbench_name(k)}.log")
    print(f"measuring {cell_name(rate, k)} ...", flush=True)
    shutil.rmtree(root / cell_name(rate, k), ignore_errors=True)
    on_cluster(k, rate, [*JOB, f"train.steps={STEPS.get(rate, 20)}", f"paths.root={root}",
                         f"study.name={cell_name(rate, k)}"], root / f"{cell_name(rate, k)}.log")


def control_s(root: Path, rate: str, k: int) -> float | None:
    points = find_points([root / cell_name(rate, k)])
    return points[0].nocomm_step_s if points else None


def disturbed(root: Path, rates: list[str], hosts: list[int]) -> list[tuple[str, int, float, float]]:
    """(rate, hosts, control, median control at that host count) of the cells measured under other load."""
    out = []
    for k in hosts:
        controls = {rate: control_s(root, rate, k) for rate in rates}
        known = [c for c in controls.values() if c is not None]
        if len(known) < 3:
            continue
        typical = statistics.median(known)
        out += [(rate, k, c, typical) for rate, c in controls.items() if c is not None and c > DISTURBED * typical]
    return out


def remeasure_disturbed(root: Path, rates: list[str], hosts: list[int]) -> None:
    for rate, k, control, typical in disturbed(root, rates, hosts):
        print(f"{cell_name(rate, k)} looks disturbed (no-comm control step {control * 1e3:.2f} ms, median "
              f"{typical * 1e3:.2f} ms at {k} hosts): measuring it again", flush=True)
        measure_cell(root, rate, k)


def commbench_name(hosts: int) -> str:
    return f"commbench-unlimited-h{hosts}"


def pct(predicted: float, measured: float) -> float:
    return 100 * (predicted - measured) / measured


def validate(root: Path, rates: list[str], hosts: list[int], fit_rate: str, fit_hosts: list[int]) -> int:
    fit_points: list[Point] = []
    for k in fit_hosts:
        fit_points += find_points([root / cell_name(fit_rate, k)])
    fitted = fit_from_points(fit_points)
    assert fitted is not None, "no bucket timeline in the fit runs"
    alpha_s, fit_bandwidth = fitted
    share = fit_bandwidth * 8 / rate_bit_s(fit_rate)
    print(f"fit on {', '.join(cell_name(fit_rate, k) for k in fit_hosts)}: alpha {alpha_s * 1e6:.0f} us, "
          f"B {fit_bandwidth / 1e6:.2f} MB/s = {100 * share:.1f}% of the {fit_rate} Mbit/s link")
    unshaped: Link | Links | None = None
    if "unlimited" in rates:
        unshaped, _ = commbench_links([root / commbench_name(k) for k in hosts
                                       if list((root / commbench_name(k)).glob("*/commbench.json"))])
        fits = unshaped.by_world_size if isinstance(unshaped, Links) else ((0, unshaped),)
        print("unshaped links from commbench: " + "; ".join(
            f"{n} hosts alpha {link.alpha_s * 1e6:.0f} us, B {link.bandwidth_Bps / 1e6:.0f} MB/s" for n, link in fits))
    print()
    header = (f"{'link':>10} {'hosts':>5} | {'step_s pred':>11} {'meas':>8} {'err':>7} | "
              f"{'exposed pred':>12} {'meas':>8} {'err':>7} | {'ctrl ms':>7} | held out")
    print(header)
    print("-" * len(header))
    step_errors, exposed_errors, pairs, shaped = [], [], [], []
    for rate in rates:
        bit_s = rate_bit_s(rate)
        link = unshaped if bit_s is None else Link(alpha_s, share * bit_s / 8, f"{rate} Mbit/s")
        for k in hosts:
            measured = find_points([root / cell_name(rate, k)])
            if not measured:
                print(f"{rate:>10} {k:>5} | no completed run")
                continue
            m = measured[0]
            p = predict(fit_points, Target(k, link, batch_per_rank=m.batch_per_rank))
            held_out = not (rate == fit_rate and k in fit_hosts)
            step_err = pct(p.step_s, m.step_s)
            exposed_err = pct(p.comm_exposed_s, m.get("comm_exposed_s"))
            if held_out:
                step_errors.append(abs(step_err))
                exposed_errors.append(abs(exposed_err))
                pairs.append((p.step_s, m.step_s))
                if bit_s is not None:
                    shaped.append((abs(step_err), abs(exposed_err)))
            label = f"{rate} Mbit/s" if bit_s else "unlimited"
            print(f"{label:>10} {k:>5} | {p.step_s:11.4f} {m.step_s:8.4f} {step_err:+6.1f}% | "
                  f"{p.comm_exposed_s:12.4f} {m.get('comm_exposed_s'):8.4f} {exposed_err:+6.1f}% | "
                  f"{1e3 * (m.nocomm_step_s or 0.0):7.2f} | {'yes' if held_out else 'no (fit)'}")
    order_ok = sum(1 for i, a in enumerate(pairs) for b in pairs[i + 1:]
                   if (a[0] - b[0]) * (a[1] - b[1]) > 0)
    order_total = len(pairs) * (len(pairs) - 1) // 2
    print(f"\nheld-out cells: {len(step_errors)}")
    print(f"step_s: mean absolute error {statistics.mean(step_errors):.1f}% (target <= 10%), "
          f"worst {max(step_errors):.1f}% (target <= 20%)")
    print(f"exposed communication: mean absolute error {statistics.mean(exposed_errors):.1f}%, "
          f"worst {max(exposed_errors):.1f}% (target within 15%)")
    print(f"order of the configurations by step_s: {order_ok} of {order_total} pairs as measured")
    if shaped and len(shaped) < len(step_errors):
        print(f"shaped links only ({len(shaped)} cells): step_s mean {statistics.mean(s for s, _ in shaped):.1f}%, "
              f"worst {max(s for s, _ in shaped):.1f}%; exposed mean {statistics.mean(e for _, e in shaped):.1f}%, "
              f"worst {max(e for _, e in shaped):.1f}%")
    ok = statistics.mean(step_errors) <= 10 and max(step_errors) <= 20
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/validate-predict"))
    parser.add_argument("--rates", default="50,100,200,500,unlimited", help="Mbit/s per direction, or unlimited")
    parser.add_argument("--hosts", default="2,3,4")
    parser.add_argument("--fit-rate", default="200")
    parser.add_argument("--fit-hosts", default="2")
    parser.add_argument("--reuse", action="store_true", help="keep cells already measured under --root")
    parser.add_argument("--keep-disturbed", action="store_true",
                        help=f"do not measure again the cells whose no-comm control is over {DISTURBED:g}x the "
                             "median of their host count")
    parser.add_argument("--redo", default="", metavar="RATE:HOSTS,...",
                        help="with --reuse, measure these cells again (e.g. unlimited:3,500:4)")
    args = parser.parse_args()
    rates = args.rates.split(",")
    hosts = [int(h) for h in args.hosts.split(",")]
    redo = {cell_name(*cell.split(":")) for cell in args.redo.split(",") if cell}
    measure(args.root, rates, hosts, args.reuse, redo)
    if not args.keep_disturbed:
        remeasure_disturbed(args.root, rates, hosts)
    return validate(args.root, rates, hosts, args.fit_rate, [int(h) for h in args.fit_hosts.split(",")])


if __name__ == "__main__":
    sys.exit(main())
