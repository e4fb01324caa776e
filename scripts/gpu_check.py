"""Every CUDA claim of the training job, checked against a cause of known size, in one table.

    python scripts/gpu_check.py [--out results.json] [--only GROUP[,GROUP]] [--deadline-s 360] [--steps 30]

Each row runs real jobs (``python -m scaling.train`` or ``torchrun``) or a
short script on the package's own instruments, and compares what they say
with something measured independently: a plain loop written here,
``torch.cuda.max_memory_allocated`` taken by that loop, a delay injected on
purpose. Groups (``--only`` runs some of them; every group left out is listed
as not run, with the reason):

  single_gpu  CUDA-event step time vs the wall clock and vs a plain loop; overhead; the memory peak vs
              max_memory_allocated; MFU against the right peak; a 50 ms data stall recovered in data_s
  two_ranks   2 ranks (gloo on CUDA tensors): a device delay per bucket recovered in comm_s, buckets.json,
              a stalled rank recovered as straggler
  ddp_hook    the NCCL DDP hook path: a 1-rank NCCL group, torch.cuda._sleep on the stream before an async
              all-reduce, completion stamped at least the sleep after launch
  nccl        NCCL initialises and all-reduces (commbench, 1 rank)
  fsdp        dist.strategy=fsdp on 2 ranks, bf16 MixedPrecisionPolicy: model state, bytes, gathered memory,
              the peak against a plain fully_shard loop
  exposure    FSDP and ZeRO-1 on CUDA: a device delay put into the reduce-scatters, the all-gathers, ZeRO's
              broadcast, recovered in the right kind's busy and exposed time; busy never a sum of overlaps
  ops         the op profile on CUDA: kernel times vs compute_s, pass labels (no backward operator in the
              device copy of forward), bf16/TF32/fp32 peaks, device bandwidth, mlp memory- vs arithmetic-bound
  multi_gpu   with 2 or more GPUs: one GPU per local rank, more NCCL ranks than GPUs refused in one line, a
              2-rank NCCL DDP job with the device delay recovered
  hooks       the fp16, bf16 and PowerSGD comm hooks on CUDA tensors: wire bytes, a finite loss
  inference   python -m scaling.infer on CUDA: latency, samples/s, memory, a host stall, the server answer

First the dependencies (Hydra, OmegaConf and its parser; scripts/make_wheels.sh makes them as wheels in
.whl/, which gpu_check.sh installs), then CUDA: without one it says so in one line and exits 2. A torch
other than CI's is named in a warning. Each row is printed, and written to ``--out`` (JSON, rewritten
after every row), as it finishes. A group that would not finish before ``--deadline-s`` is not started.
Exit status 0 when every row run passed and no group was cut by the deadline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESNET = ["+exp=resnet", "model=resnet50", "data.image_size=224", "train.amp=bf16", "train.batch_size=64",
          "data.num_samples=1024", "logger.wandb.mode=disabled", "train.log_every=10"]
MLP = ["+exp=mlp", "model.in_features=1024", "model.hidden=1024", "model.layers=4", "train.batch_size=256",
       "data.num_samples=4096", "dist.bucket_cap_mb=2", "logger.wandb.mode=disabled", "train.log_every=5",
       "instrument.flops=false"]
TRANSFORMER = ["+exp=transformer", "model.d_model=1024", "model.n_layers=4", "model.n_heads=16", "model.d_ff=4096",
               "data.seq_len=512", "train.batch_size=16", "data.num_samples=512", "logger.wandb.mode=disabled",
               "train.log_every=10"]

PLAIN_LOOP = r'''
import json, sys, time
import torch, torch.nn.functional as F, torchvision
from torch.utils.data import DataLoader, TensorDataset
steps, warmup, batch, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
device = torch.device("cuda")
gen = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(1024, 3, 224, 224, generator=gen), torch.randint(0, 10, (1024,), generator=gen))
loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, pin_memory=True, generator=gen)
torch.manual_seed(0)
model = torchvision.models.resnet50(weights=None, num_classes=10).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
it = iter(loader)
for step in range(warmup + steps):
    if step == warmup:
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); start = time.perf_counter()
    try:
        x, y = next(it)
    except StopIteration:
        it = iter(loader); x, y = next(it)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
torch.cuda.synchronize()
wall = time.perf_counter() - start
json.dump({"step_s": wall / steps, "samples_per_s": batch * steps / wall,
           "max_memory_allocated": torch.cuda.max_memory_allocated()}, open(out, "w"))
'''

# dist.strategy=fsdp: four 1024x1024 layers and a 1024->10 head (every dim 0 even: no padding on 2 ranks).
FSDP_WIDTH, FSDP_LAYERS, FSDP_CLASSES = 1024, 4, 10
FSDP_PSI = FSDP_LAYERS * (FSDP_WIDTH * FSDP_WIDTH + FSDP_WIDTH) + FSDP_WIDTH * FSDP_CLASSES + FSDP_CLASSES
FSDP_MLP = ["+exp=mlp", f"model.in_features={FSDP_WIDTH}", f"model.hidden={FSDP_WIDTH}",
            f"model.layers={FSDP_LAYERS}", "train.batch_size=256", "data.num_samples=8192", "optim=adamw",
            "train.amp=bf16", "dist.strategy=fsdp", "logger.wandb.mode=disabled", "train.log_every=5",
            "instrument.flops=false", "instrument.ops=false", "instrument.control_steps=0"]

PLAIN_FSDP_LOOP = r'''
import json, os, sys
import torch, torch.distributed as dist, torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from scaling.train.models import wide_mlp
steps, warmup, batch, width, layers, classes, backend, out = sys.argv[1:9]
steps, warmup, batch, width, layers, classes = map(int, (steps, warmup, batch, width, layers, classes))
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
torch.cuda.set_device(device)
torch.manual_seed(0)
model = wide_mlp(width, width, layers, classes).to(device)
mesh = init_device_mesh("cuda", (world,))
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for block in model:
    if any(True for _ in block.parameters()):
        fully_shard(block, mesh=mesh, mp_policy=policy)
fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
gen = torch.Generator(device="cpu").manual_seed(rank)
for step in range(warmup + steps):
    if step == warmup:
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(device)
    x = torch.randn(batch, width, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
torch.cuda.synchronize()
json.dump({"max_memory_allocated": torch.cuda.max_memory_allocated(device)}, open(f"{out}.{rank}", "w"))
dist.destroy_process_group()
'''


class Check:
    """The table: rows as they finish, printed and (``out``) written at once; groups not run listed as such."""

    def __init__(self, out: Path | None = None, header: dict | None = None) -> None:
        self.rows: list[dict] = []
        self.out = out
        self.header = header or {}

    def row(self, name: str, what: str, measured: str, expected: str, ok: bool) -> None:
        self._add({"check": name, "what": what, "measured": measured, "expected": expected, "ok": bool(ok),
                   "status": "pass" if ok else "fail"})
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {what}: {measured} (expected {expected})", flush=True)

    def fail(self, name: str, error: str) -> None:
        self.row(name, "ran", error[-400:].replace("\n", " | "), "exit 0", False)

    def not_run(self, name: str, what: str, reason: str) -> None:
        self._add({"check": name, "what": what, "measured": None, "expected": None, "ok": None, "status": "not run",
                   "reason": reason})
        print(f"[NOT RUN] {name}: {reason}", flush=True)

    def _add(self, row: dict) -> None:
        self.rows.append(row)
        if self.out is not None:  # rewritten whole after every row: a cut run leaves a readable file
            partial = self.out.with_name(self.out.name + ".partial")
            partial.write_text(json.dumps({**self.header, "rows": self.rows}, indent=1))
            partial.replace(self.out)

    @property
    def passed(self) -> bool:
        return all(r["ok"] for r in self.rows if r["status"] != "not run")


class Deadline:
    """The whole call's time limit: no group starts that would not finish, no job outlives it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


DEADLINE = Deadline(float("inf"))
"""Replaced by main() with the one given; every job's timeout is cut to what is left of it."""


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    out.update(PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="4",
               PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def run(cmd: list[str], timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
    timeout = max(1.0, min(timeout, DEADLINE.left()))
    proc = subprocess.run(cmd, cwd=REPO, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:6])}…\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")
    return proc


def train(root: Path, name: str, overrides: list[str], nproc: int = 1, prelude: str | None = None,
          **extra: str) -> dict:
    """One training job; ``prelude``: Python run in each rank before ``scaling.train`` (a delay put in place)."""
    args = ["-m", "scaling.train", *overrides, f"paths.root={root}", f"study.name={name}"]
    if prelude is not None:
        code = f"{prelude}\nimport runpy; runpy.run_module('scaling.train', run_name='__main__', alter_sys=True)"
        args = ["-c", code, *args[2:]]
    if nproc == 1:
        run([sys.executable, *args], **extra)
    else:
        launcher = ["--no-python", sys.executable] if prelude is not None else []
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher,
             *args], **extra)
    run_dir = next(p for p in (root / name).iterdir() if p.is_dir())
    record = json.loads((run_dir / "run.json").read_text())
    record["_steps"] = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line]
    record["_dir"] = str(run_dir)
    return record


def within(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * abs(target)


def check_single_gpu(check: Check, root: Path, steps: int) -> None:
    plain_out = root / "plain.json"
    run([sys.executable, "-c", PLAIN_LOOP, str(steps), "5", "64", str(plain_out)])
    plain = json.loads(plain_out.read_text())
    inst = train(root, "resnet", [*RESNET, f"train.steps={steps}", "train.warmup_steps=5"])
    s, mem, flops = inst["summary"], inst["memory"]["max"], inst["flops"]
    wall_step = s["measured_wall_s"] / s["steps"]
    mean_event_step = statistics.mean(r["step_s"] for r in inst["_steps"])
    check.row("timing", "mean CUDA-event step_s vs wall clock / steps (same run)",
              f"{mean_event_step * 1e3:.2f} ms vs {wall_step * 1e3:.2f} ms", "within 3 %",
              within(mean_event_step, wall_step, 0.03))
    check.row("timing", "median step_s vs a plain loop's wall step",
              f"{s['step_s'] * 1e3:.2f} ms vs {plain['step_s'] * 1e3:.2f} ms", "within 5 %",
              within(s["step_s"], plain["step_s"], 0.05))
    check.row("overhead", "framework wall throughput / plain loop",
              f"{s['wall_samples_per_s']:.0f} / {plain['samples_per_s']:.0f} = "
              f"{s['wall_samples_per_s'] / plain['samples_per_s']:.3f}", ">= 0.98",
              s["wall_samples_per_s"] / plain["samples_per_s"] >= 0.98)
    check.row("memory", "run peak vs plain loop max_memory_allocated (after warm-up)",
              f"{mem['peak'] / 2**20:.0f} MiB vs {plain['max_memory_allocated'] / 2**20:.0f} MiB", "within 10 %",
              within(mem["peak"], plain["max_memory_allocated"], 0.10))
    parts = sum(mem[k] or 0 for k in ("params", "grads", "optimizer_state", "activations", "autocast_weights"))
    check.row("memory", "params+grads+optimizer+activations+autocast weights vs peak",
              f"{parts / 2**20:.0f} MiB vs {mem['peak'] / 2**20:.0f} MiB", "0.6..1.05 x peak",
              0.6 * mem["peak"] <= parts <= 1.05 * mem["peak"])
    check.row("memory", "autocast weight copies (bf16) vs half the fp32 params",
              f"{(mem['autocast_weights'] or 0) / 2**20:.1f} MiB vs {mem['params'] / 2 / 2**20:.1f} MiB",
              "0.8..1.05 x (batch-norm weights stay fp32)",
              0.8 * mem["params"] / 2 <= (mem["autocast_weights"] or 0) <= 1.05 * mem["params"] / 2)
    check.row("mfu", "bf16 GEMM peak probe (resnet50, bf16 autocast)",
              f"{flops['peak_per_s'] / 1e12:.0f} TFLOP/s, MFU {100 * flops['mfu']:.1f} %",
              "peak 400..1000 TFLOP/s, 0 < MFU < 1", 400e12 <= flops["peak_per_s"] <= 1000e12 and 0 < flops["mfu"] < 1)
    independent = flops["per_sample"] * 64 / plain["step_s"]
    check.row("mfu", "achieved FLOP/s vs per_sample x batch / plain step",
              f"{flops['achieved_per_s'] / 1e12:.1f} vs {independent / 1e12:.1f} TFLOP/s", "within 5 %",
              within(flops["achieved_per_s"], independent, 0.05))

    stalled = train(root, "stall", [*RESNET, "train.steps=10", "train.warmup_steps=3"],
                    SCALING_INJECT_STALL="data:0.05")
    gained = stalled["summary"]["data_s"] - s["data_s"]
    slower = stalled["summary"]["step_s"] - s["step_s"]
    # Once the device starves, the host's own batch assembly (hidden before,
    # while the device worked through queued steps) is exposed as well: the
    # step grows by the stall and a little more, all of it in data_s.
    check.row("stall", "a 50 ms host stall in data loading: data_s gain vs step_s gain (CUDA events)",
              f"+{gained * 1e3:.1f} ms of +{slower * 1e3:.1f} ms, bound {stalled['summary']['bound']}",
              ">= 47.5 ms and within 10 % of the step's gain, bound data",
              gained >= 0.0475 and within(gained, slower, 0.10) and stalled["summary"]["bound"] == "data")

    tf = train(root, "fp32", [*TRANSFORMER, "train.steps=10", "train.warmup_steps=3"])
    peak = tf["flops"]["peak_per_s"]
    check.row("mfu", "fp32 transformer: probe peak is fp32 (TF32 matmuls off by default)",
              f"{peak / 1e12:.0f} TFLOP/s, MFU {100 * tf['flops']['mfu']:.1f} %", "peak 20..120 TFLOP/s, MFU < 1",
              20e12 <= peak <= 120e12 and 0 < tf["flops"]["mfu"] < 1)


def check_two_ranks(check: Check, root: Path) -> None:
    shared = [*MLP, "dist.backend=gloo", "dist.device=cuda", "train.steps=6", "train.warmup_steps=2",
              "comm.hook=tests.gpu_hooks:device_delayed_allreduce"]
    base = train(root, "comm0", shared, nproc=2, SCALING_TEST_DELAY_S="0")
    slow = train(root, "comm1", shared, nproc=2, SCALING_TEST_DELAY_S="0.02")
    buckets = slow["summary"]["comm_buckets"]
    grown = slow["summary"]["comm_s"] - base["summary"]["comm_s"]
    check.row("comm", f"20 ms on the device per bucket x {buckets:.0f} buckets, seen in comm_s (CUDA events)",
              f"+{grown * 1e3:.1f} ms (expected {buckets * 20:.0f} ms)", "within 20 %",
              within(grown, buckets * 0.02, 0.20))
    exposed = slow["summary"]["comm_exposed_s"] - base["summary"]["comm_exposed_s"]
    slower = slow["summary"]["step_s"] - base["summary"]["step_s"]
    check.row("comm", "the same delay: comm_exposed_s gain vs step_s gain", f"+{exposed * 1e3:.1f} ms of "
              f"+{slower * 1e3:.1f} ms, bound {slow['summary']['bound']}", "within 15 %, bound communication",
              within(exposed, slower, 0.15) and slow["summary"]["bound"] == "communication")
    timeline = {name: json.loads(next((root / name).glob("*/buckets.json")).read_text())["buckets"]
                for name in ("comm0", "comm1")}
    gains = [s["allreduce_s"] - b["allreduce_s"] for b, s in zip(timeline["comm0"], timeline["comm1"])]
    check.row("buckets", "the same delay in buckets.json: each bucket's last-arrival all-reduce time (CUDA events)",
              f"+{min(gains) * 1e3:.1f} .. +{max(gains) * 1e3:.1f} ms over {len(gains)} buckets",
              "each +20 ms within 25 %, ready times in launch order",
              bool(gains) and all(within(g, 0.02, 0.25) for g in gains)
              and all(a["ready_s"] <= b["ready_s"] for a, b in zip(timeline["comm1"], timeline["comm1"][1:])))
    strag = train(root, "straggler", [*MLP, "dist.backend=gloo", "dist.device=cuda", "train.steps=6",
                                      "train.warmup_steps=2"], nproc=2, SCALING_INJECT_STALL="data:0.06@rank=1")
    s = strag["summary"]
    waits = statistics.median(r["comm_wait_s_max"] for r in strag["_steps"])
    info = s.get("straggler") or {}
    check.row("straggler", "rank 1 stalled 60 ms/step: bound, rank, phase, comm_wait_s of the waiting rank",
              f"{s['bound']}, rank {info.get('rank')}, {info.get('phase')}, {waits * 1e3:.1f} ms",
              "straggler, rank 1, data, 60 ms within 20 %",
              s["bound"] == "straggler" and info.get("rank") == 1 and info.get("phase") == "data"
              and within(waits, 0.06, 0.20))


def read_ops(root: Path, name: str) -> dict:
    return json.loads(next((root / name).glob("*/ops.json")).read_text())


def check_ops(check: Check, root: Path) -> None:
    bf16 = train(root, "ops-bf16", [*RESNET, "train.steps=5", "train.warmup_steps=3", "instrument.ops_steps=3"])
    ops = read_ops(root, "ops-bf16")
    per_step = sum(r["time_s"] for r in ops["rows"]) / ops["steps"]
    compute = bf16["summary"]["compute_s"]
    check.row("ops", "resnet50 bf16: kernel time per profiled step vs compute_s of the measured steps",
              f"{per_step * 1e3:.1f} ms vs {compute * 1e3:.1f} ms ({ops['time_source']})",
              "cuda_kernel, 0.6..1.05 x compute_s",
              ops["time_source"] == "cuda_kernel" and 0.6 * compute <= per_step <= 1.05 * compute)
    backward = [r for r in ops["rows"] if r["pass"] == "backward"]
    conv_back = sum(r["flops"] for r in backward if r["op"] == "aten::convolution_backward")
    check.row("ops", "backward operators counted (FLOPs and bytes on the autograd thread)",
              f"convolution_backward {conv_back / 1e9:.0f} GFLOP, backward bytes "
              f"{sum(r['bytes'] for r in backward) / 2**30:.1f} GiB", "both > 0",
              conv_back > 0 and sum(r["bytes"] for r in backward) > 0)
    forward_ops = {r["op"] for r in ops["rows"] if r["pass"] == "forward"}
    misplaced = sorted(op for op in forward_ops if "backward" in op)
    other_s = sum(r["time_s"] for r in ops["rows"] if r["kind"] == "other")
    total_s = sum(r["time_s"] for r in ops["rows"]) or 1.0
    check.row("ops", "pass labels on CUDA: no backward operator in forward, counted operators keep their kind",
              f"backward operators in forward: {misplaced or 'none'}; kind other {100 * other_s / total_s:.1f} % "
              "of kernel time", "none, < 5 %", not misplaced and other_s < 0.05 * total_s)
    hardware = ops["hardware"]
    peak_bf16, membw = hardware["peak_flops_per_s"].get("bf16", 0.0), hardware["peak_membw_Bps"]
    check.row("ops", "bf16 roof and device-to-device bandwidth (STREAM copy/scale/add/triad)",
              f"{peak_bf16 / 1e12:.0f} TFLOP/s, {membw / 1e12:.2f} TB/s, ridge {peak_bf16 / membw:.0f} FLOP/B",
              "400..1000 TFLOP/s, 1..5.5 TB/s", 400e12 <= peak_bf16 <= 1000e12 and 1e12 <= membw <= 5.5e12)
    train(root, "ops-fp32", ["+exp=resnet", "data.image_size=112", "train.batch_size=32", "data.num_samples=256",
                             "logger.wandb.mode=disabled", "train.steps=3", "train.warmup_steps=2",
                             "instrument.flops=false", "instrument.control_steps=0"])
    fp32 = read_ops(root, "ops-fp32")
    conv = {r["precision"] for r in fp32["rows"] if r["op"].startswith("aten::convolution")}
    matmul = {r["precision"] for r in fp32["rows"] if r["op"] in ("aten::addmm", "aten::mm")}
    peaks = fp32["hardware"]["peak_flops_per_s"]
    check.row("ops", "fp32 resnet18: convolutions in TF32 (cuDNN default), its matrix products in fp32",
              f"convolutions {sorted(conv)}, matrix products {sorted(matmul)}, tf32 "
              f"{peaks.get('tf32', 0) / 1e12:.0f} vs fp32 {peaks.get('fp32', 0) / 1e12:.0f} TFLOP/s",
              "['tf32'], ['fp32'], tf32 > 2 x fp32",
              conv == {"tf32"} and matmul == {"fp32"} and peaks.get("tf32", 0) > 2 * peaks.get("fp32", 1))
    bounds = {}
    for batch in (1, 512):
        name = f"ops-mlp-b{batch}"
        done = train(root, name, ["+exp=mlp", "model.in_features=2048", "model.hidden=2048", "model.layers=2",
                                  f"train.batch_size={batch}", "data.num_samples=2048", "logger.wandb.mode=disabled",
                                  "train.steps=3", "train.warmup_steps=2", "instrument.flops=false",
                                  "instrument.control_steps=0"])
        bounds[batch] = (done["summary"]["compute_bound"], done["summary"]["memory_frac"])
    check.row("ops", "mlp compute_bound at batch 1 and at batch 512 (memory_frac)",
              f"{bounds[1][0]} ({100 * bounds[1][1]:.0f}%), {bounds[512][0]} ({100 * bounds[512][1]:.0f}%)",
              "memory, arithmetic", bounds[1][0] == "memory" and bounds[512][0] == "arithmetic")


def check_fsdp(check: Check, root: Path) -> None:
    import torch

    two_gpus = torch.cuda.device_count() >= 2
    backend = "nccl" if two_gpus else "gloo"
    where = "NCCL, 2 GPUs" if two_gpus else "gloo on CUDA tensors, 2 ranks on 1 GPU"
    done = train(root, "fsdp", [*FSDP_MLP, f"dist.backend={backend}", "dist.device=cuda", "train.steps=6",
                                "train.warmup_steps=2"], nproc=2)
    # AdamW with fp32 master parameters and gradients: (4 + 4 + 8) bytes per parameter, halved on 2 ranks.
    formula = 16 * FSDP_PSI / 2
    states = [r["model_state"] for r in done["memory"]["per_rank"]]
    predicted = [r["model_state"] for r in done["memory_model"]["per_rank"]]
    check.row("fsdp", f"model state per rank vs 16 psi / 2 and vs memory_model ({where})",
              f"{[round(b / 2**20, 1) for b in states]} MiB vs {formula / 2**20:.1f} MiB, predicted "
              f"{[round(b / 2**20, 1) for b in predicted]} MiB", "each within 5 %",
              done["strategy_effective"] == "fsdp" and all(within(b, formula, 0.05) for b in states)
              and all(within(b, p, 0.05) for b, p in zip(states, predicted)))
    steps = done["_steps"]
    gathered = {s["comm_allgather_fwd_bytes_max"] for s in steps} | {s["comm_allgather_bwd_bytes_max"] for s in steps}
    reduced = {s["comm_reducescatter_bytes_max"] for s in steps}
    check.row("fsdp", "bytes per step: all-gathers in bf16 (2 B/param), reduce-scatter in fp32 (4 B/param)",
              f"all-gather {sorted(gathered)}, reduce-scatter {sorted(reduced)}",
              f"{2 * FSDP_PSI} and {4 * FSDP_PSI}", gathered == {2 * FSDP_PSI} and reduced == {4 * FSDP_PSI})
    unsharded = done["memory"]["max"]["params_unsharded"]
    check.row("fsdp", "gathered bf16 parameters at once vs memory_model (two blocks in backward)",
              f"{unsharded / 2**20:.1f} MiB vs {done['memory_model']['max']['params_unsharded'] / 2**20:.1f} MiB",
              "within 5 %", within(unsharded, done["memory_model"]["max"]["params_unsharded"], 0.05))
    out = root / "plain_fsdp.json"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
         sys.executable, "-c", PLAIN_FSDP_LOOP, "6", "2", "256", str(FSDP_WIDTH), str(FSDP_LAYERS), str(FSDP_CLASSES), backend, str(out)])
    plain = max(json.loads(Path(f"{out}.{rank}").read_text())["max_memory_allocated"] for rank in (0, 1))
    peak = done["memory"]["max"]["peak"]
    check.row("fsdp", "run peak vs a plain fully_shard loop's max_memory_allocated (after warm-up)",
              f"{peak / 2**20:.0f} MiB vs {plain / 2**20:.0f} MiB", "within 10 %", within(peak, plain, 0.10))


def check_nccl(check: Check, root: Path) -> None:
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
         "scaling.commbench", "commbench.ops=[all_reduce]", "commbench.min_bytes=1048576",
         "commbench.max_bytes=67108864", "commbench.iters=10", "dist.backend=nccl", f"paths.root={root}"])
    result = json.loads(next(root.glob("commbench/*/commbench.json")).read_text())
    largest = max(result["results"], key=lambda r: r["bytes"])
    check.row("nccl", "commbench all_reduce on NCCL (1 rank)",
              f"backend {result['backend']}, {largest['bytes'] >> 20} MiB in {largest['time_s'] * 1e6:.0f} us",
              "backend nccl, a time > 0", result["backend"] == "nccl" and largest["time_s"] > 0)


DDP_HOOK_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from scaling.instruments.clock import CudaClock
from scaling.instruments.comm import CommTimer
sleep_s, out = float(sys.argv[1]), sys.argv[2]
device = torch.device("cuda", 0)
torch.cuda.set_device(device)
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda._sleep(10_000_000)
start.record(); torch.cuda._sleep(100_000_000); end.record(); end.synchronize()
cycles = int(sleep_s * 100_000_000 / (start.elapsed_time(end) / 1e3))

def sleepy_allreduce(state, bucket):  # the device busy on this stream before the async all-reduce
    torch.cuda._sleep(cycles)
    return default_hooks.allreduce_hook(state, bucket)

clock = CudaClock(device)
timer = CommTimer(clock, 1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1024, 1024).to(device), device_ids=[0],
                                                  bucket_cap_mb=1)
model.register_comm_hook(None, timer.wrap(sleepy_allreduce))
gaps = []
for step in range(6):
    timer.begin_backward(clock.mark())
    model(torch.randn(64, 1024, device=device)).sum().backward()
    events = timer.take_step().events
    if step >= 2:  # after DDP's bucket rebuild
        gaps += [clock.seconds_between(e.launch, e.done) for e in events]
json.dump({"gaps_s": gaps, "buckets": len(events)}, open(out, "w"))
dist.destroy_process_group()
"""


def check_ddp_hook(check: Check, root: Path) -> None:
    out = root / "ddp_hook.json"
    run([sys.executable, "-c", DDP_HOOK_SCRIPT, "0.02", str(out)])
    done = json.loads(out.read_text())
    gaps = done["gaps_s"]
    check.row("ddp_hook", "NCCL DDP hook path (1 rank): 20 ms device sleep before each async all-reduce, "
              "completion - launch per bucket (CUDA events)",
              f"{min(gaps) * 1e3:.1f} .. {max(gaps) * 1e3:.1f} ms over {len(gaps)} buckets", ">= 20 ms, < 25 ms",
              bool(gaps) and min(gaps) >= 0.0199 and max(gaps) < 0.025)


DELAY_PRELUDE = "import tests.gpu_hooks as hooks; hooks.delay_collectives()"


def _gain(base: dict, slow: dict, key: str) -> float:
    return slow["summary"][key] - base["summary"][key]


def _busy_is_a_union(done: dict, kinds: tuple[str, ...]) -> bool:
    """comm_s covers the longest kind and never exceeds the kinds' sum (rank 0's steps)."""
    steps = [json.loads(line) for line in (Path(done["_dir"]) / "logs" / "rank0.steps.jsonl").read_text().splitlines()
             if line.strip()]
    return all(max(st[f"comm_{k}_s"] for k in kinds) - 1e-6 <= st["comm_s"]
               <= st["comm_sync_s"] + sum(st[f"comm_{k}_s"] for k in kinds) + 1e-6 for st in steps)


def check_exposure(check: Check, root: Path) -> None:
    import torch

    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    where = "NCCL, 2 GPUs" if backend == "nccl" else "gloo on CUDA tensors, 2 ranks on 1 GPU"
    fsdp = [*FSDP_MLP, f"dist.backend={backend}", "dist.device=cuda", "train.steps=6", "train.warmup_steps=2"]
    delay = "0.01"
    base = train(root, "exp-fsdp", fsdp, nproc=2, prelude=DELAY_PRELUDE)
    rs = train(root, "exp-fsdp-rs", fsdp, nproc=2, prelude=DELAY_PRELUDE, SCALING_TEST_DELAY_KIND="reducescatter",
               SCALING_TEST_DELAY_S=delay)
    calls = rs["summary"]["comm_buckets"]
    busy = _gain(base, rs, "comm_reducescatter_s")
    exposed, slower = _gain(base, rs, "comm_reducescatter_exposed_s"), _gain(base, rs, "step_s")
    gathers = _gain(base, rs, "comm_allgather_fwd_exposed_s") + _gain(base, rs, "comm_allgather_bwd_exposed_s")
    check.row("exposure", f"fsdp ({where}): 10 ms on the device per reduce-scatter x {calls:.0f}: busy gain, "
              "exposed gain vs step_s gain, all-gather exposure",
              f"+{busy * 1e3:.1f} ms busy, +{exposed * 1e3:.1f} of +{slower * 1e3:.1f} ms exposed, all-gathers "
              f"{gathers * 1e3:+.1f} ms", f"busy {calls * 10:.0f} ms within 20 %, exposed within 20 % of the step's "
              "gain, all-gathers within 2 ms",
              within(busy, calls * 0.01, 0.20) and within(exposed, slower, 0.20) and abs(gathers) < 0.002)
    ag = train(root, "exp-fsdp-ag", fsdp, nproc=2, prelude=DELAY_PRELUDE, SCALING_TEST_DELAY_KIND="allgather",
               SCALING_TEST_DELAY_S=delay)
    exposed = _gain(base, ag, "comm_allgather_fwd_exposed_s") + _gain(base, ag, "comm_allgather_bwd_exposed_s")
    slower, scatters = _gain(base, ag, "step_s"), _gain(base, ag, "comm_reducescatter_exposed_s")
    check.row("exposure", f"fsdp ({where}): 10 ms on the device per all-gather: exposed all-gather gain vs step_s "
              "gain, reduce-scatter exposure",
              f"+{exposed * 1e3:.1f} of +{slower * 1e3:.1f} ms, reduce-scatters {scatters * 1e3:+.1f} ms",
              "within 20 %, reduce-scatters within 2 ms", within(exposed, slower, 0.20) and abs(scatters) < 0.002)
    kinds = ("allgather_fwd", "allgather_bwd", "reducescatter")
    check.row("exposure", "fsdp busy time: comm_s a union of the kinds' intervals (every step, rank 0)",
              f"{base['summary']['comm_s'] * 1e3:.1f} ms vs kinds' sum "
              f"{sum(base['summary'][f'comm_{k}_s'] for k in kinds) * 1e3:.1f} ms",
              "max kind <= comm_s <= sum", _busy_is_a_union(base, kinds) and _busy_is_a_union(rs, kinds))
    zero = [*MLP, "dist.strategy=zero1", "optim=adamw", f"dist.backend={backend}", "dist.device=cuda",
            "train.steps=6", "train.warmup_steps=2", "instrument.control_steps=0"]
    zbase = train(root, "exp-zero", zero, nproc=2, prelude=DELAY_PRELUDE)
    zslow = train(root, "exp-zero-bc", zero, nproc=2, prelude=DELAY_PRELUDE, SCALING_TEST_DELAY_KIND="broadcast",
                  SCALING_TEST_DELAY_S=delay)
    exposed, slower = _gain(zbase, zslow, "comm_broadcast_exposed_s"), _gain(zbase, zslow, "step_s")
    reduced = _gain(zbase, zslow, "comm_allreduce_exposed_s")
    check.row("exposure", f"zero1 ({where}): 10 ms on the device per broadcast: exposed broadcast gain vs step_s "
              "gain, all-reduce exposure", f"+{exposed * 1e3:.1f} of +{slower * 1e3:.1f} ms, all-reduce "
              f"{reduced * 1e3:+.1f} ms", "within 15 %, all-reduce within 2 ms",
              within(exposed, slower, 0.15) and abs(reduced) < 0.002)


def check_hooks(check: Check, root: Path) -> None:
    import torch

    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    shared = [*MLP, f"dist.backend={backend}", "dist.device=cuda", "train.steps=6", "train.warmup_steps=3",
              "instrument.control_steps=0", "instrument.ops=false"]
    for hook, share in (("fp16", (0.5, 0.5)), ("bf16", (0.5, 0.5)), ("powersgd", (0.0, 0.1))):
        done = train(root, f"hook-{hook}", [*shared, f"comm.hook={hook}"], nproc=2)
        steps = done["_steps"]
        ratio = statistics.median(st["comm_wire_bytes"] / st["comm_bytes"] for st in steps)
        loss = done["final_loss"]
        check.row("hooks", f"comm.hook={hook} on CUDA tensors ({backend}): wire bytes / gradient bytes, loss",
                  f"{ratio:.3f}, loss {loss:.4f}, comm_s {done['summary']['comm_s'] * 1e3:.2f} ms",
                  f"{share[0]}..{share[1]}, a finite loss, comm_s > 0",
                  share[0] <= ratio <= share[1] + 1e-9 and math.isfinite(loss) and done["summary"]["comm_s"] > 0)


MAPPING_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from scaling import cli, config
from scaling.launch import detect, group
cfg = config.parse(cli.compose_config(["+exp=mlp", "dist.backend=nccl"]))
ctx = group.init(detect.detect(), cfg.dist)
x = torch.full((1,), float(ctx.rank), device=ctx.device)
dist.all_reduce(x)
json.dump({"device": ctx.device.index, "current": torch.cuda.current_device(), "sum": float(x)},
          open(f"{sys.argv[1]}.{ctx.rank}", "w"))
group.teardown()
"""


def check_multi_gpu(check: Check, root: Path) -> None:
    import torch

    gpus = torch.cuda.device_count()
    out = root / "mapping"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "--no-python",
         sys.executable, "-c", MAPPING_SCRIPT, str(out)])
    seen = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(gpus)]
    check.row("multi_gpu", f"one GPU per local rank ({gpus} ranks, NCCL): device and current device per rank",
              f"{[(s['device'], s['current']) for s in seen]}, all-reduce {seen[0]['sum']:.0f}",
              f"rank r on GPU r, all-reduce {gpus * (gpus - 1) // 2}",
              [(s["device"], s["current"]) for s in seen] == [(r, r) for r in range(gpus)]
              and seen[0]["sum"] == gpus * (gpus - 1) // 2)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={gpus + 1}", "-m", "scaling.train", *MLP, "dist.backend=nccl",
                           "train.steps=2", f"paths.root={root}"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=max(1.0, min(120, DEADLINE.left())))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("scaling.train: error:")]
    check.row("multi_gpu", f"{gpus + 1} NCCL ranks on {gpus} GPUs: refused before any process group, one line",
              f"exit {proc.returncode}: {lines[0][:120] if lines else proc.stderr[-200:]}",
              "exit != 0, 'dist.backend=nccl: N processes on this node and M visible GPUs'",
              proc.returncode != 0 and len(lines) == 1 and "visible GPUs" in lines[0])
    shared = [*MLP, "dist.backend=nccl", "train.steps=6", "train.warmup_steps=2",
              "comm.hook=tests.gpu_hooks:device_delayed_allreduce"]
    base = train(root, "nccl0", shared, nproc=2, SCALING_TEST_DELAY_S="0")
    slow = train(root, "nccl1", shared, nproc=2, SCALING_TEST_DELAY_S="0.02")
    buckets, grown = slow["summary"]["comm_buckets"], _gain(base, slow, "comm_s")
    check.row("multi_gpu", f"2-rank NCCL DDP: 20 ms on the device per bucket x {buckets:.0f}, seen in comm_s",
              f"+{grown * 1e3:.1f} ms, bound {slow['summary']['bound']}", f"{buckets * 20:.0f} ms within 20 %, "
              "bound communication", within(grown, buckets * 0.02, 0.20) and slow["summary"]["bound"] == "communication")


INFER_RESNET = ["+exp=resnet", "model=resnet50", "data.image_size=224", "train.amp=bf16", "data.num_samples=64",
                "logger.wandb.mode=disabled", "dist.device=cuda", "infer.warmup_queries=10"]
INFER_SIZES = (1, 8, 64)

INFER_LOOP = r"""
import json, statistics, sys
import torch, torchvision
sizes, queries, out = [int(s) for s in sys.argv[1].split(",")], int(sys.argv[2]), sys.argv[3]
device = torch.device("cuda")
torch.manual_seed(0)
model = torchvision.models.resnet50(weights=None, num_classes=10).to(device).eval()
result = {}
for b in sizes:
    x = torch.randn(b, 3, 224, 224, device=device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(10):
            model(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(queries):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); model(x); end.record(); end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(queries):
            model(x)
        end.record(); end.synchronize()
        offline = b * queries / (start.elapsed_time(end) / 1e3)
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        model(x); torch.cuda.synchronize()
    result[b] = {"p50_s": statistics.median(times), "offline_samples_per_s": offline,
                 "max_memory_allocated": torch.cuda.max_memory_allocated()}
    del x
json.dump(result, open(out, "w"))
"""


def infer(root: Path, name: str, overrides: list[str], **extra: str) -> dict:
    run([sys.executable, "-m", "scaling.infer", *overrides, f"paths.root={root}", f"study.name={name}"], **extra)
    return json.loads(next((root / name).glob("*/infer.json")).read_text())


def check_inference(check: Check, root: Path) -> None:
    sizes = ",".join(map(str, INFER_SIZES))
    plain_out = root / "plain_infer.json"
    run([sys.executable, "-c", INFER_LOOP, sizes, "50", str(plain_out)])
    plain = {int(b): v for b, v in json.loads(plain_out.read_text()).items()}
    done = infer(root, "infer", [*INFER_RESNET, f"infer.batch_sizes=[{sizes}]", "infer.queries=50",
                                 "infer.latency_budget_ms=30", "infer.ops=false"])
    points = {p["batch_size"]: p for p in done["batches"]}
    wall = {b: points[b]["latency_s"]["p50"] for b in INFER_SIZES}
    events = {b: plain[b]["p50_s"] for b in INFER_SIZES}
    check.row("inference", "single-stream p50 (wall, synchronised) vs a plain loop's CUDA-event p50, per batch",
              ", ".join(f"b{b} {wall[b] * 1e3:.2f}/{events[b] * 1e3:.2f} ms" for b in INFER_SIZES),
              "each within 15 %, never below the events by more than 3 %",
              all(within(wall[b], events[b], 0.15) and wall[b] >= 0.97 * events[b] for b in INFER_SIZES))
    largest = INFER_SIZES[-1]
    offline = points[largest]["offline"]["samples_per_s"]
    check.row("inference", f"offline samples/s at batch {largest} vs the plain loop's back-to-back CUDA events",
              f"{offline:.0f} vs {plain[largest]['offline_samples_per_s']:.0f}", "within 10 %",
              within(offline, plain[largest]["offline_samples_per_s"], 0.10))
    peaks = {b: points[b]["memory"]["peak"] for b in INFER_SIZES}
    check.row("inference", "peak device memory of one forward per batch vs the plain loop's max_memory_allocated",
              ", ".join(f"b{b} {peaks[b] / 2**20:.0f}/{plain[b]['max_memory_allocated'] / 2**20:.0f} MiB"
                        for b in INFER_SIZES), "each within 10 %, growing with the batch",
              all(within(peaks[b], plain[b]["max_memory_allocated"], 0.10) for b in INFER_SIZES)
              and all(peaks[a] < peaks[b] for a, b in zip(INFER_SIZES, INFER_SIZES[1:])))
    weights = points[1]["memory"]["weights"]
    check.row("inference", "weights: resnet50's parameters and buffers in fp32 (25.6 M parameters)",
              f"{weights / 2**20:.1f} MiB", "90..110 MiB", 90 * 2**20 <= weights <= 110 * 2**20)
    stalled = infer(root, "infer-stall", [*INFER_RESNET, "infer.batch_sizes=[1]", "infer.queries=30",
                                          "infer.scenario=single_stream", "infer.ops=false"],
                    SCALING_INJECT_STALL="forward:0.02")
    gained = stalled["batches"][0]["latency_s"]["p50"] - wall[1]
    check.row("inference", "a 20 ms host stall per forward: p50 latency gain at batch 1",
              f"+{gained * 1e3:.1f} ms", "20 ms within 10 %", within(gained, 0.02, 0.10))
    server = done.get("server") or {}
    replay = server.get("replay") or {}
    served = [replay[k] for k in ("answer", "next") if k in replay]
    check.row("inference", "server answer and next rate served live on the GPU (30 ms budget)",
              (f"{server['rate_qps']:.0f} q/s p99 {served[0]['p99_s'] * 1e3:.1f} ms, {server['next_rate_qps']:.0f} "
               f"q/s p99 {served[1]['p99_s'] * 1e3:.1f} ms, agrees={replay['agrees']}") if len(served) == 2
              else f"no replay (rate {server.get('rate_qps')})",
              "both served, >= 662 queries each (agreement reported, not required)",
              len(served) == 2 and all(t["queries"] >= 662 for t in served))


GROUPS: dict[str, tuple[str, int, int]] = {
    "single_gpu": ("timing, overhead, memory, mfu, stall (resnet50 bf16, fp32 transformer)", 1, 75),
    "two_ranks": ("comm, buckets, straggler: 2 ranks, gloo on CUDA tensors", 1, 45),
    "ddp_hook": ("the NCCL DDP hook path: completion at least the device sleep after launch", 1, 15),
    "nccl": ("commbench all_reduce on NCCL, 1 rank", 1, 15),
    "fsdp": ("fsdp on 2 ranks: model state, bytes, gathered memory, peak vs a plain loop", 1, 40),
    "exposure": ("fsdp and zero1 exposure with a device delay per collective kind; busy as a union", 1, 75),
    "ops": ("op profile on CUDA: kernel times, pass labels, precisions, bandwidth, bounds", 1, 60),
    "multi_gpu": ("one GPU per local rank, too many NCCL ranks refused, 2-rank NCCL DDP", 2, 45),
    "hooks": ("fp16, bf16 and PowerSGD comm hooks on CUDA tensors", 1, 40),
    "inference": ("scaling.infer on CUDA: latency, samples/s, memory, stall, server", 1, 45),
}
"""name -> (what it checks, GPUs it needs, seconds it takes on one H100/H200, about: estimates, not yet measured).

In the order they run: the claims most often relied on first, so that a deadline cuts the others."""

DEPENDENCIES = {"hydra": "hydra-core==1.3.2", "omegaconf": "omegaconf==2.3.0", "antlr4": "antlr4-python3-runtime==4.9.3",
                "packaging": "packaging", "yaml": "PyYAML", "numpy": "numpy", "psutil": "psutil"}
"""What the jobs import beyond torch (module -> requirement); scripts/make_wheels.sh makes each a wheel."""


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def missing_dependencies(importable=_importable) -> list[str]:
    """The requirements of the jobs that this Python cannot import (Hydra and its parser among them)."""
    return [requirement for module, requirement in DEPENDENCIES.items() if not importable(module)]


def group_function(name: str):
    return globals()[f"check_{name}"]


def run_groups(check: Check, selected: list[str], root: Path, gpus: int, steps: int, deadline: Deadline,
               groups: dict[str, tuple[str, int, int]] = GROUPS, function=group_function) -> bool:
    """Every group in ``groups`` order: run, or listed as not run with the reason. False when the deadline cut one."""
    cut = False
    for name, (what, needs, estimate_s) in groups.items():
        if name not in selected:
            check.not_run(name, what, "not selected (--only)")
        elif gpus < needs:
            check.not_run(name, what, f"needs {needs} GPUs, {gpus} visible")
        elif deadline.left() < estimate_s:
            check.not_run(name, what, f"deadline: {max(0.0, deadline.left()):.0f} s left, the group takes "
                                      f"about {estimate_s} s")
            cut = True
        else:
            try:
                call = function(name)
                call(check, root, steps) if name == "single_gpu" else call(check, root)
            except Exception as exc:  # one failing group must not hide the others
                check.fail(name, str(exc))
    return not cut


def torch_warning(version: str) -> str | None:
    """A warning line when this torch is not the release CI runs the suite on (build tags aside)."""
    from scaling import compat

    if compat.release(version)[0] == compat.release(compat.CI_TORCH)[0]:
        return None
    return (f"gpu_check: warning: torch {version} is not CI's ({compat.CI_TORCH}): a failing row may be this "
            "torch's difference")


def parse_only(value: str | None) -> list[str]:
    if value is None:
        return list(GROUPS)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in GROUPS]
    if unknown or not chosen:
        print(f"gpu_check: error: --only {value}: no such group {unknown or value!r}; groups: {', '.join(GROUPS)}",
              file=sys.stderr)
        raise SystemExit(2)
    return chosen


def main(argv: list[str] | None = None) -> int:
    global DEADLINE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the table as JSON, rewritten as each row finishes")
    parser.add_argument("--only", help=f"comma-separated groups to run: {', '.join(GROUPS)}")
    parser.add_argument("--deadline-s", type=float, default=360.0, help="no group starts that would end after this")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    selected = parse_only(args.only)
    missing = missing_dependencies()
    if missing:
        print(f"gpu_check: error: this Python ({sys.version.split()[0]}) lacks {', '.join(missing)}: make the wheels "
              "with `bash scripts/make_wheels.sh` where a package index is reachable and copy .whl/ here "
              "(bash scripts/gpu_check.sh installs them)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from scaling import compat

    refusal = compat.refusal()
    if refusal is not None:
        print(f"gpu_check: error: {refusal}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: error: no CUDA device visible (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); nothing to check", file=sys.stderr)
        return 2
    DEADLINE = Deadline(args.deadline_s)
    gpus = torch.cuda.device_count()
    header = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
              "gpus": gpus, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    print(f"torch {header['torch']}, CUDA {header['cuda']}, NCCL {header['nccl']}, {gpus} x {header['device']}",
          flush=True)
    warning = torch_warning(torch.__version__)
    if warning:
        print(warning, flush=True)
    if not _importable("torchvision"):
        print("gpu_check: warning: no torchvision (install the one built for this torch): the resnet rows fail",
              flush=True)
    check = Check(args.out, header)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        complete = run_groups(check, selected, Path(tmp), gpus, args.steps, DEADLINE)
    print(f"\n{'check':<10} {'':<7} {'what':<78} measured  [expected]")
    for r in check.rows:
        if r["status"] == "not run":
            print(f"{r['check']:<10} {'NOT RUN':<7} {r['what'][:78]:<78} ({r['reason']})")
        else:
            print(f"{r['check']:<10} {r['status'].upper():<7} {r['what'][:78]:<78} {r['measured']}  [{r['expected']}]")
    ran = [r for r in check.rows if r["status"] != "not run"]
    print(f"\n{sum(r['ok'] for r in ran)} passed, {sum(not r['ok'] for r in ran)} failed, "
          f"{len(check.rows) - len(ran)} groups not run, in {time.time() - started:.0f} s")
    return 0 if check.passed and complete else 1


if __name__ == "__main__":
    sys.exit(main())
