"""MPI launch with a real MPI (the MPICH wheel) and real torch.distributed: discovery, the MPI hook, training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scaling.config import ConfigError
from scaling.launch import mpi
from scaling.launch.layout import Launch
from tests.jobs import TINY, check, job_env, only_run_dir, read_json, run_command, run_mpi

# Each rank writes its own file: ranks' lines on a shared stdout can interleave.
DISCOVER = """
import dataclasses, json, pathlib, sys
from scaling.launch import detect
launch = detect.detect()
pathlib.Path(sys.argv[1], f"rank{launch.rank}.json").write_text(json.dumps(dataclasses.asdict(launch)))
"""

# Each rank computes the gradient of its own batch without DDP, then with DDP and the MPI
# hook; the hook's result must be the mean of the per-rank gradients on every rank.
HOOK_JOB = """
import json, pathlib, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from scaling.config import DistConfig
from scaling.launch import detect, group, mpi

launch = detect.detect()
mpi.check_hook_launch(launch)
ctx = group.init(launch, DistConfig(backend="gloo", bucket_cap_mb=0.001, timeout_s=60, threads=1))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
torch.manual_seed(100 + ctx.rank)
x, y = torch.randn(16, 32), torch.randn(16, 4)
torch.nn.functional.mse_loss(model(x), y).backward()
local = torch.cat([p.grad.flatten() for p in model.parameters()])
model.zero_grad(set_to_none=True)
ddp = DDP(model, bucket_cap_mb=0.001)  # several buckets, so the hook runs more than once
calls = []
def counting_hook(state, bucket):
    calls.append(bucket.buffer().numel())
    return mpi.mpi_allreduce_hook(state, bucket)
ddp.register_comm_hook(None, counting_hook)
for _ in range(2):  # DDP re-buckets by bucket_cap_mb after its first iteration
    calls.clear()
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
reduced = torch.cat([p.grad.flatten() for p in model.parameters()])
everyone = [torch.empty_like(local) for _ in range(ctx.world_size)]
dist.all_gather(everyone, local)
expected = torch.stack(everyone).mean(dim=0)
pathlib.Path(sys.argv[1], f"rank{ctx.rank}.json").write_text(json.dumps({"rank": ctx.rank, "buckets": len(calls),
      "max_abs_error": (reduced - expected).abs().max().item(), "grad_norm": reduced.norm().item(),
      "local_differs": (local - expected).abs().max().item()}))
dist.barrier()  # both ranks done with gloo before either tears it down (without it 1 run in 6 aborted at exit)
del ddp  # DDP's reducer holds the process group: release it first
group.teardown(ctx)
"""


def per_rank_json(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("rank*.json"))]


@pytest.mark.mpi
def test_discover_three_ranks_on_two_cores_as_whoever_runs_the_tests(tmp_path: Path) -> None:
    # More ranks than this machine's cores, run as root in CI: MPICH needs no setting for either.
    check(run_mpi(3, ["-c", DISCOVER, str(tmp_path)]))
    launches = per_rank_json(tmp_path)
    assert len(launches) == 3
    assert sorted(launch["rank"] for launch in launches) == [0, 1, 2]
    assert sorted(launch["local_rank"] for launch in launches) == [0, 1, 2]
    for launch in launches:
        assert (launch["launcher"], launch["world_size"], launch["local_world_size"]) == ("mpi", 3, 3)
    # Everyone agrees on rank 0's rendezvous; on one host that is the loopback address.
    assert {(launch["master_addr"], launch["master_port"]) for launch in launches} == {
        ("127.0.0.1", launches[0]["master_port"])}
    assert 1024 <= launches[0]["master_port"] <= 65535


@pytest.mark.mpi
def test_mpi_hook_averages_gradients_in_real_ddp(tmp_path: Path) -> None:
    check(run_mpi(2, ["-c", HOOK_JOB, str(tmp_path)]))
    reports = per_rank_json(tmp_path)
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["buckets"] >= 2
        assert report["max_abs_error"] < 1e-6
        assert report["local_differs"] > 1e-3  # the ranks' own gradients did differ: averaging was needed
    assert reports[0]["grad_norm"] == pytest.approx(reports[1]["grad_norm"], rel=1e-6)


def test_hook_refuses_a_job_not_launched_by_mpi() -> None:
    with pytest.raises(ConfigError, match=r"comm.hook=mpi needs an MPI launch \(mpiexec.*launched by torchrun"):
        mpi.check_hook_launch(Launch("torchrun", rank=0, local_rank=0, world_size=2, local_world_size=2))


def test_missing_mpi4py_is_one_clear_line(tmp_path: Path) -> None:
    # As if mpi4py were not installed (None in sys.modules makes its import fail), under an MPI launcher's variables.
    program = ("import sys; sys.modules['mpi4py'] = None\n"
               "from scaling import cli\nfrom scaling.bench import collectives\n"
               f"sys.exit(cli.run('scaling.commbench', collectives.main, 'commbench', argv=['paths.root={tmp_path}']))")
    proc = run_command([sys.executable, "-c", program], env=job_env(PMI_SIZE="2", PMI_RANK="0"))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert "mpi4py" in err[0] and "pip install 'scaling[mpi]'" in err[0]


@pytest.fixture(scope="module")
def mpiexec_jobs(tmp_path_factory) -> dict[str, dict]:
    """The same 2-rank training job under mpiexec, once with the default all-reduce hook, once with MPI's."""
    records = {}
    for hook in ("allreduce", "mpi"):
        root = tmp_path_factory.mktemp(f"mpiexec-{hook}")
        args = ["-m", "scaling.train", *TINY["mlp"], "train.steps=3", "train.warmup_steps=1", "instrument.flops=false",
                "instrument.ops=false", "instrument.control_steps=0", f"comm.hook={hook}", f"paths.root={root}"]
        check(run_mpi(2, args))
        records[hook] = read_json(only_run_dir(root / "adhoc") / "run.json")
    return records


@pytest.mark.mpi
@pytest.mark.parametrize("hook", ["allreduce", "mpi"])
def test_training_under_mpiexec(hook: str, mpiexec_jobs: dict[str, dict]) -> None:
    record = mpiexec_jobs[hook]
    assert (record["status"], record["launcher"], record["world_size"], record["comm_hook"]) == (
        "completed", "mpi", 2, hook)
    summary = record["summary"]
    # The gradients went through the chosen all-reduce, and its time was measured.
    assert summary["comm_bytes"] > 0 and summary["comm_s"] > 0


@pytest.mark.mpi
def test_the_mpi_hook_trains_the_same_weights_as_the_default_hook(mpiexec_jobs: dict[str, dict]) -> None:
    """MPI's all-reduce and gloo's sum the same gradients: the same seeded job ends at the same loss (float
    sums in another order differ in the last bits only). A hook that forgot the 1/N, or averaged twice,
    would end elsewhere."""
    losses = {hook: record["final_loss"] for hook, record in mpiexec_jobs.items()}
    assert losses["mpi"] == pytest.approx(losses["allreduce"], rel=1e-5), losses
