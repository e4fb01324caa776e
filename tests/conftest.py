"""Shared helpers: real jobs launched the way a user launches them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# wandb has tests of its own; elsewhere its start-up would only slow the jobs down.
NO_WANDB = "logger.wandb.mode=disabled"
# Small enough for a 2-core machine, large enough that every instrument has work.
TINY = {
    "mlp": ["+exp=mlp", "model.hidden=256", "model.in_features=64", "model.layers=2", "train.batch_size=4",
            "data.num_samples=256", NO_WANDB],
    "resnet": ["+exp=resnet", "data.image_size=16", "train.batch_size=4", "data.num_samples=64", NO_WANDB],
    "transformer": ["+exp=transformer", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=128",
                    "model.vocab_size=256", "data.seq_len=16", "train.batch_size=4", "data.num_samples=64", NO_WANDB],
}
QUICK = ["train.steps=4", "train.warmup_steps=1", "train.log_every=2", "instrument.flops=false"]


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)  # XDG_CACHE_HOME included: the session's own cache folder (see ``own_cache``)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # explicit, whatever an earlier in-process job left in os.environ
    env.update(extra or {})
    return env


def torchrun(nproc: int, overrides: list[str], env: dict[str, str] | None = None, timeout: float = 300,
             module: str = "scaling.train", cwd: Path = REPO) -> subprocess.CompletedProcess:
    """A real ``torchrun --standalone`` job."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *overrides]
    return subprocess.run(cmd, cwd=cwd, env=job_env(env), capture_output=True, text=True, timeout=timeout)


def single(overrides: list[str], env: dict[str, str] | None = None, timeout: float = 300,
           module: str = "scaling.train", cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m scaling.train`` with no launcher."""
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, env=job_env(env),
                          capture_output=True, text=True, timeout=timeout)


def only_run_dir(root: Path, study: str = "adhoc") -> Path:
    runs = [p for p in (root / study).iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder under {root / study}, found {runs}"
    return runs[0]


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    run = json.loads((run_dir / "run.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
    return run, steps


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache folder of the test session's own, for the jobs it starts and for in-process tests.

    The FLOP/s probe caches its result per host under ``$XDG_CACHE_HOME/scaling``:
    a test must neither read a figure a user's job measured nor leave its own behind.
    """
    cache = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is false on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
