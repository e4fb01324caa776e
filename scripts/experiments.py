"""Measurements too noisy on a shared machine to be pass/fail tests: each prints its figures.

  control   the no-communication control steps (``instrument.control_steps``) against the same two
            processes written as a plain DDP loop under ``no_sync()``, interleaved pairs, the ratio of
            the medians. A control that kept any communication reads well above 1.
  hog       the op profile's memory-bound against arithmetic-bound time, quiet and with a STREAM-like
            copy loop on the other core: memory-bound operators should slow more. Each quiet/loud pair
            is bracketed by a probe of the job's own SGD update on core 0 without and with the hog,
            so that a pair where the two cores did not share a memory bottleneck can be told apart.
  coverage  the op profile's operator times per profiled step against the measured steps' compute
            time, over repeated one-process jobs: the two are different steps, so they agree only
            within the host's noise (tests/test_ops.py bounds the ratio by more than twice the
            deviation this prints).
  links     interference (step - no-comm control step - exposed communication) of the same resnet
            job on an unshaped, a 250 Mbit/s and a 100 Mbit/s link between two emulated hosts
            (scripts/netns_cluster.py, as root), one job at a time: a slower link should add exposed
            transfer, not interference.

    python scripts/experiments.py control [--pairs 5]
    python scripts/experiments.py hog [--pairs 4]
    python scripts/experiments.py coverage [--pairs 10]
    sudo python scripts/experiments.py links [--pairs 2]

All run real jobs (one thread per process) in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], timeout_s: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        sys.exit(f"experiments.py: {' '.join(cmd[:6])} ... exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout


def only_run(root: Path) -> Path:
    (run_dir,) = [p for p in (root / "adhoc").iterdir() if p.is_dir()]
    return run_dir


def torchrun(nproc: int, *args: str) -> str:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args])


# -- control ---------------------------------------------------------------------------------------

PLAIN_NO_SYNC = r'''
import json, statistics, sys, time
import torch, torch.distributed as dist, torch.nn.functional as F, torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
out, steps, batch, size, synced = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
gen = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(256, 3, size, size, generator=gen), torch.randint(0, 10, (256,), generator=gen))
loader = DataLoader(data, batch_size=batch, sampler=DistributedSampler(data, world, rank, seed=0, drop_last=True),
                    drop_last=True)
torch.manual_seed(0)
model = DDP(torchvision.models.resnet18(weights=None, num_classes=10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
times, it = [], iter(loader)
def train_step():
    global it
    try:
        x, y = next(it)
    except StopIteration:
        it = iter(loader); x, y = next(it)
    F.cross_entropy(model(x), y).backward()
    optimizer.step(); optimizer.zero_grad()
# First the synchronised steps the framework's job runs before its controls (warm-up and measured).
for _ in range(synced):
    train_step()
with model.no_sync():
    for step in range(3 + steps):
        start = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - start)
local = torch.tensor([statistics.median(times[3:])], dtype=torch.float64)
gathered = [torch.zeros_like(local) for _ in range(world)]
dist.all_gather(gathered, local)
if rank == 0:
    json.dump({"nocomm_step_s": statistics.mean(float(g) for g in gathered)}, open(out, "w"))
dist.barrier()
del model  # DDP's reducer before the process group it uses
dist.destroy_process_group()
'''


def control(pairs: int, work: Path) -> None:
    batch, size = 8, 32
    overrides = ["+exp=resnet", f"data.image_size={size}", f"train.batch_size={batch}", "data.num_samples=256",
                 "train.steps=2", "train.warmup_steps=2", "train.log_every=2", "instrument.flops=false",
                 "instrument.memory=false", "instrument.control_steps=30", "instrument.ops=false",
                 "logger.wandb.mode=disabled"]
    script = work / "plain_no_sync.py"
    script.write_text(PLAIN_NO_SYNC)
    framework, plain = [], []
    for attempt in range(pairs):
        root = work / f"framework{attempt}"
        torchrun(2, "-m", "scaling.train", *overrides, f"paths.root={root}")
        framework.append(json.loads((only_run(root) / "run.json").read_text())["controls"]["nocomm_step_s"])
        out = work / f"plain{attempt}.json"
        torchrun(2, str(script), str(out), "30", str(batch), str(size), "4")
        plain.append(json.loads(out.read_text())["nocomm_step_s"])
        print(f"pair {attempt + 1}: control {framework[-1]:.4f} s, plain no_sync loop {plain[-1]:.4f} s", flush=True)
    ratio = statistics.median(framework) / statistics.median(plain)
    print(f"control/plain, ratio of medians over {pairs} pairs: {ratio:.3f} "
          f"(control {min(framework):.4f}-{max(framework):.4f} s, plain {min(plain):.4f}-{max(plain):.4f} s)")


# -- hog -------------------------------------------------------------------------------------------

UPDATE = ["model.in_features=4096", "model.hidden=4096"]
UPDATE_PROBE = """
import time, torch
torch.set_num_threads(1)
p, g = torch.randn(4096, 4096), torch.randn(4096, 4096)
best = float("inf")
for _ in range(20):
    t0 = time.perf_counter()
    p.add_(g, alpha=-0.01)
    best = min(best, time.perf_counter() - t0)
print(3 * p.numel() * p.element_size() / best)  # read p and g, write p
"""


HOG = """
import numpy as np
a = np.ones(64 * 2**20, dtype=np.float32); b = np.zeros_like(a)
np.copyto(b, a)
print("copying", flush=True)
while True:
    np.copyto(b, a)
"""


def update_Bps(prefix: list[str]) -> float:
    """Bytes per second of the job's own SGD update on one thread."""
    return float(run([*prefix, sys.executable, "-c", UPDATE_PROBE], 120).split()[-1])


def time_of(ops: dict, kind: str) -> float:
    return sum(r["time_s"] for r in ops["rows"] if r["kind"] == kind)


def ops_job(root: Path, overrides: list[str], prefix: list[str]) -> dict:
    run([*prefix, sys.executable, "-m", "scaling.train", *overrides, f"paths.root={root}"])
    return json.loads((only_run(root) / "ops.json").read_text())


def hog(pairs: int, work: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        sys.exit("experiments.py hog: needs two cores and taskset")
    core0 = ["taskset", "-c", "0"]
    overrides = ["+exp=mlp", *UPDATE, "model.layers=1", "train.batch_size=32", "data.num_samples=256",
                 "logger.wandb.mode=disabled", "train.steps=3", "train.warmup_steps=1", "train.log_every=3",
                 "instrument.flops=false", "instrument.control_steps=0", "instrument.ops_steps=10"]
    rises = []
    for pair in range(pairs):
        quiet_Bps = update_Bps(core0)
        quiet = ops_job(work / f"quiet{pair}", overrides, core0)
        copier = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
        try:
            copier.stdout.readline()  # its arrays allocated and touched
            before = update_Bps(core0)
            loud = ops_job(work / f"loud{pair}", overrides, core0)
            after = update_Bps(core0)
        finally:
            copier.kill()
            copier.wait()
        slowdown = quiet_Bps / max(before, after)
        rise = ((time_of(loud, "memory") / time_of(loud, "arithmetic"))
                / (time_of(quiet, "memory") / time_of(quiet, "arithmetic")))
        rises.append(rise)
        print(f"pair {pair + 1}: the hog slowed the update probe {slowdown:.2f}x; memory-bound against "
              f"arithmetic-bound time rose {rise:.3f}x", flush=True)
    print(f"median rise over {pairs} pairs: {statistics.median(rises):.3f}")


# -- coverage --------------------------------------------------------------------------------------

MATRIX_MATRIX = ["+exp=mlp", "model.in_features=1024", "model.hidden=1024", "model.layers=2", "train.batch_size=256",
                 "data.num_samples=1024", "logger.wandb.mode=disabled", "train.steps=3", "train.warmup_steps=1",
                 "train.log_every=3", "instrument.flops=false", "instrument.control_steps=0"]


def coverage(runs: int, work: Path) -> None:
    ratios = []
    for i in range(runs):
        root = work / f"run{i}"
        ops = ops_job(root, MATRIX_MATRIX, [])
        compute_s = json.loads((only_run(root) / "run.json").read_text())["summary"]["compute_s"]
        per_step = sum(r["time_s"] for r in ops["rows"]) / ops["steps"]
        ratios.append(per_step / compute_s)
        print(f"run {i + 1}: operators {per_step * 1e3:.2f} ms per profiled step, compute {compute_s * 1e3:.2f} ms "
              f"per measured step, ratio {ratios[-1]:.3f}", flush=True)
    print(f"ratio over {runs} runs: median {statistics.median(ratios):.3f}, {min(ratios):.3f}-{max(ratios):.3f}")


# -- links -----------------------------------------------------------------------------------------

LINK_RATES = ("unlimited", "250mbit", "100mbit")
RESNET_JOB = ["-m", "scaling.train", "+exp=resnet", "data.image_size=32", "train.batch_size=16", "train.steps=2",
              "train.warmup_steps=1", "train.log_every=2", "data.num_samples=256", "instrument.flops=false",
              "instrument.ops=false", "logger.wandb.mode=disabled"]


def links(rounds: int, work: Path) -> None:
    if os.geteuid() != 0:
        sys.exit("experiments.py links: must run as root (network namespaces and tc)")
    tool = str(REPO / "scripts" / "netns_cluster.py")
    for round_ in range(rounds):
        for rate in LINK_RATES:
            root = work / f"{rate}-{round_}"
            run([sys.executable, tool, "--hosts", "2", "--rate", rate, "--mtu", "9000", "--torchrun", "--",
                 *RESNET_JOB, f"paths.root={root}"], 600)
            record = json.loads((only_run(root) / "run.json").read_text())
            s, nocomm = record["summary"], record["controls"]["nocomm_step_s"]
            print(f"round {round_ + 1} {rate:>9}: step {s['step_s']:.3f} s, no-comm control {nocomm:.3f} s, exposed "
                  f"{s['comm_exposed_s']:.3f} s, interference {s['step_s'] - nocomm - s['comm_exposed_s']:+.3f} s",
                  flush=True)


EXPERIMENTS = {"control": (control, 5), "hog": (hog, 4), "coverage": (coverage, 10), "links": (links, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs, runs or rounds (control 5, hog 4, coverage 10, links 2)")
    args = parser.parse_args()
    experiment, default = EXPERIMENTS[args.experiment]
    with tempfile.TemporaryDirectory(prefix="scaling-experiments-") as tmp:
        experiment(args.pairs or default, Path(tmp))


if __name__ == "__main__":
    main()
