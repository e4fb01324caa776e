"""The supported torch range and the calls that differ inside it (scaling.compat).

Each version-specific call is exercised for real at the end of the range this torch is at, and
the other end's form is reached by taking the newer name away (an older torch has no
``all_gather_single``, no ``forward_sync_buffers``). scripts/check_torch_versions.sh runs this
file on the oldest and the newest supported torch.
"""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from scaling import compat
from scaling.bench import collectives
from tests.jobs import NO_WANDB, single

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_rank_group():
    """A real one-process gloo group, as ``launcher=single`` makes it."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_pyproject_states_the_range_compat_enforces():
    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert compat.range_text() in requirements
    assert compat.range_text("torchvision", compat.TORCHVISION_RANGE) in requirements


@pytest.mark.parametrize("version, ok", [
    ("2.8.1", False), ("2.9.0rc1", False), ("2.9.0", True), ("2.9.0+cu128", True),  # the oldest end
    ("2.11.0a0+git5b1c2d.nv25.10", True), ("2.14.1", True),  # a site's source build; CI's
    ("2.15.0", True), ("2.15.1+cu130", True), ("2.16.0a0+git1234", False), ("2.16.0", False),  # the newest end
])
def test_each_end_of_the_range(version, ok):
    assert compat.supported(version) is ok
    assert (compat.refusal(version) is None) is ok


def test_this_torch_is_in_the_range():
    assert compat.refusal() is None, compat.refusal()


@pytest.mark.parametrize("version", ["2.8.0", "2.16.0"])
def test_an_unsupported_torch_is_one_line_before_anything_runs(version, tmp_path):
    # A distribution record of another torch ahead of the real one on the path: what the
    # package's metadata lookup finds first.
    record = tmp_path / f"torch-{version}.dist-info"
    record.mkdir()
    (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    proc = single(["+exp=mlp", "train.steps=1", "train.warmup_steps=1", "instrument.ops=false", NO_WANDB,
                   f"paths.root={tmp_path / 'runs'}"], env={"PYTHONPATH": f"{REPO}:{tmp_path}"}, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines == [f"scaling.train: error: torch {version} is not supported; scaling needs torch>=2.9,<2.16 "
                     "(2.9.0 is the first release whose FSDP2 takes custom collectives; pyproject.toml and "
                     "scaling/compat.py state the range)"]
    assert not (tmp_path / "runs").exists()


def _spy(monkeypatch, name, calls=None):
    calls = [] if calls is None else calls
    real = getattr(dist, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, name, spy)
    return calls


def _gather_and_scatter():
    inp = torch.arange(4, dtype=torch.float32)
    gathered = torch.empty(4)
    compat.all_gather_into(gathered, inp)
    reduced = torch.empty(4)
    compat.reduce_scatter_into(reduced, inp)
    return gathered, reduced, inp


def test_collectives_of_an_older_torch(one_rank_group, monkeypatch):
    monkeypatch.delattr(dist, "all_gather_single", raising=False)
    monkeypatch.delattr(dist, "reduce_scatter_single", raising=False)
    calls = _spy(monkeypatch, "all_gather_into_tensor")
    _spy(monkeypatch, "reduce_scatter_tensor", calls)
    gathered, reduced, inp = _gather_and_scatter()
    assert torch.equal(gathered, inp) and torch.equal(reduced, inp)
    assert calls == ["all_gather_into_tensor", "reduce_scatter_tensor"]


def test_collectives_of_a_newer_torch(one_rank_group, monkeypatch):
    if not hasattr(dist, "all_gather_single"):
        pytest.skip(f"torch {torch.__version__} has no all_gather_single (the older form is tested above)")
    gather_calls = _spy(monkeypatch, "all_gather_single")
    scatter_calls = _spy(monkeypatch, "reduce_scatter_single")
    gathered, reduced, inp = _gather_and_scatter()
    assert torch.equal(gathered, inp) and torch.equal(reduced, inp)
    assert gather_calls == ["all_gather_single"] and scatter_calls == ["reduce_scatter_single"]


@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter"])
def test_commbench_runs_on_a_torch_without_the_single_collectives(op, one_rank_group, monkeypatch):
    monkeypatch.delattr(dist, "all_gather_single", raising=False)
    monkeypatch.delattr(dist, "reduce_scatter_single", raising=False)
    case = collectives.torch_case(op, 8, 1, torch.device("cpu"))
    case.fill(1.0)
    case.call()
    assert (case.output() == collectives.expected_output(op, 1, 8)).all()


def test_ddp_buffer_switch_by_the_name_each_end_knows(one_rank_group):
    def older(self, module, device_ids=None, broadcast_buffers=True): ...

    def newer(self, module, device_ids=None, broadcast_buffers=None, forward_sync_buffers=None): ...

    assert compat.ddp_buffer_sync(False, older) == {"broadcast_buffers": False}
    assert compat.ddp_buffer_sync(False, newer) == {"forward_sync_buffers": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated keyword would warn
        model = nn.parallel.DistributedDataParallel(nn.BatchNorm1d(3), **compat.ddp_buffer_sync(False))
    assert model.broadcast_buffers is False


def test_zero_parameter_sync_is_named_or_refused():
    from torch.distributed.optim import ZeroRedundancyOptimizer

    assert compat.zero_sync_params(ZeroRedundancyOptimizer) == "_sync_params"
    with pytest.raises(RuntimeError, match=re.escape("torch>=2.9,<2.16")):
        compat.zero_sync_params(type("Without", (), {}))


@pytest.mark.parametrize("end", ["this torch", "without the reduction tag"])
def test_reductions_are_known_at_each_end(end):
    tags = torch.Tag if end == "this torch" else SimpleNamespace(pointwise=torch.Tag.pointwise)
    aten = torch.ops.aten
    assert [compat.is_reduction(op, tags) for op in (aten.sum.dim_IntList, aten.mean.default, aten.amax.default,
                                                     aten.max.default)] == [True] * 4
    assert [compat.is_reduction(op, tags) for op in (aten.add.Tensor, aten.max.other, aten.mm.default)] == [False] * 3


def test_flop_formula_of_a_matrix_product():
    a, b = torch.empty(3, 5), torch.empty(5, 7)
    formula = compat.flop_formula(torch.ops.aten.mm)
    assert formula(a, b, out_val=torch.empty(3, 7)) == 2 * 3 * 5 * 7
    assert compat.flop_formula(torch.ops.aten.relu) is None


def test_fsdp_internals_the_cuda_timing_waits_at(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mesh = init_device_mesh("cpu", (1,))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(torch.ones(2, 4)).sum().backward()  # FSDP's lazy initialisation makes the groups
    groups = compat.fsdp_param_groups(model)
    assert len(groups) == 2  # the root has no parameters of its own
    assert all(callable(getattr(g, compat.FSDP_ALL_GATHER_WAIT)) for g in groups)
    assert all(callable(getattr(g, compat.FSDP_POST_BACKWARD)) for g in groups)
    assert all(callable(getattr(state, compat.FSDP_BACKWARD_END)) for state in compat.fsdp_states(model))
    all_gather, reduce_scatter = compat.fsdp_comm_bases()
    assert callable(all_gather.__call__) and callable(reduce_scatter.__call__)
    assert all(compat.all_gather_in_flight(g) is None for g in groups)  # none left after a step
