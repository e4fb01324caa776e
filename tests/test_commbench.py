"""scaling.commbench as a user runs it: real torchrun / mpiexec jobs, records checked against the formulas."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from scaling import cli
from scaling.bench import collectives
from tests.jobs import check, only_run_dir, read_json, run_mpi, torchrun

# nccl-tests' bus-bandwidth factors, written out here rather than taken from the code under test.
BUS_FACTOR = {
    2: {"all_reduce": 1.0, "all_gather": 0.5, "reduce_scatter": 0.5, "broadcast": 1.0},
    3: {"all_reduce": 4 / 3, "all_gather": 2 / 3, "reduce_scatter": 2 / 3, "broadcast": 1.0},
}
TABLE_ROW = re.compile(r"^\s+(torch|mpi)\s+(\w+)\s+(\d+)\s+(\d+)\s+float\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def bench_args(root: Path, *extra: str) -> list[str]:
    return ["-m", "scaling.commbench", f"paths.root={root}", "commbench.min_bytes=1024",
            "commbench.max_bytes=65536", "commbench.iters=3", "commbench.warmup_iters=1", *extra]


def check_rows(record: dict[str, Any]) -> None:
    factors = BUS_FACTOR[record["world_size"]]
    for row in record["results"]:
        assert row["time_s"] > 0
        assert row["algbw_GBps"] == pytest.approx(row["bytes"] / row["time_s"] / 1e9, rel=1e-9)
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * factors[row["op"]], rel=1e-9)


def check_png(path: Path) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def table_rows(stdout: str) -> list[tuple[str, str, int]]:
    return [(m[1], m[2], int(m[3])) for line in stdout.splitlines() if (m := TABLE_ROW.match(line))]


def test_torchrun_gloo_three_ranks(tmp_path: Path) -> None:
    stdout = check(torchrun(3, bench_args(tmp_path), module=None))
    run_dir = only_run_dir(tmp_path / "commbench")
    record = read_json(run_dir / "commbench.json")
    assert (record["backend"], record["world_size"], record["nodes"], record["launcher"]) == ("gloo", 3, 1, "torchrun")
    assert record["run_id"] == run_dir.name
    sizes = {row["op"]: [] for row in record["results"]}
    for row in record["results"]:
        assert row["transport"] == "torch"
        sizes[row["op"]].append(row["bytes"])
    powers = [2**k for k in range(10, 17)]
    assert sizes["all_reduce"] == powers and sizes["broadcast"] == powers
    # Gathered/scattered totals are whole float32 chunks per rank: 1024 B over 3 ranks moves 1020 B.
    assert sizes["all_gather"] == sizes["reduce_scatter"] == [p // 12 * 12 for p in powers]
    check_rows(record)
    assert {(f["op"], f["transport"]) for f in record["fit"]} == {(op, "torch") for op in BUS_FACTOR[3]}
    for fit in record["fit"]:
        assert fit["alpha_s"] >= 0 and (fit["bandwidth_GBps"] is None or fit["bandwidth_GBps"] > 0)
    check_png(run_dir / "commbench.png")
    # The printed table has one row per record, with the recorded numbers.
    printed = table_rows(stdout)
    assert printed == [(r["transport"], r["op"], r["bytes"]) for r in record["results"]]


@pytest.mark.mpi
def test_mpiexec_gloo_and_mpi_transports(tmp_path: Path) -> None:
    args = bench_args(tmp_path, "commbench.mpi=true", "commbench.ops=[all_reduce,reduce_scatter]", "study.name=cb")
    stdout = check(run_mpi(2, args))
    record = read_json(only_run_dir(tmp_path / "cb") / "commbench.json")
    assert (record["backend"], record["world_size"], record["launcher"]) == ("gloo", 2, "mpi")
    assert record["mpi_library"]
    keys = {(r["transport"], r["op"]) for r in record["results"]}
    assert keys == {(t, op) for t in ("torch", "mpi") for op in ("all_reduce", "reduce_scatter")}
    for transport in ("torch", "mpi"):
        assert [r["bytes"] for r in record["results"] if r["transport"] == transport and r["op"] == "all_reduce"] \
            == [2**k for k in range(10, 17)]
    check_rows(record)
    assert [(f["op"], f["transport"]) for f in record["fit"]] == [
        ("all_reduce", "torch"), ("reduce_scatter", "torch"), ("all_reduce", "mpi"), ("reduce_scatter", "mpi")]
    assert len(table_rows(stdout)) == len(record["results"])
    check_png(only_run_dir(tmp_path / "cb") / "commbench.png")


def test_single_process_has_no_bus_traffic_and_no_fit(tmp_path: Path) -> None:
    argv = [f"paths.root={tmp_path}", "commbench.min_bytes=4096", "commbench.max_bytes=8192", "commbench.iters=2",
            "commbench.warmup_iters=0", "commbench.ops=[all_reduce,broadcast]", "paths.run_id=single"]
    assert cli.run("scaling.commbench", collectives.main, "commbench", argv=argv) == 0
    record = read_json(tmp_path / "commbench" / "single" / "commbench.json")
    assert (record["world_size"], record["launcher"], record["fit"]) == (1, "single", [])
    by_op = {r["op"]: r for r in record["results"] if r["bytes"] == 8192}
    # nccl-tests' convention: one rank all-reducing moves nothing over a bus.
    assert by_op["all_reduce"]["busbw_GBps"] == 0.0
    assert by_op["broadcast"]["busbw_GBps"] == by_op["broadcast"]["algbw_GBps"] > 0
    # The same run id again is refused, not overwritten.
    assert cli.run("scaling.commbench", collectives.main, "commbench", argv=argv) == 2


@pytest.mark.parametrize(
    "override, expected",
    [
        ("commbench.ops=[all_reduce,all_to_all]", "commbench.ops: unknown op 'all_to_all'; valid: all_reduce"),
        ("commbench.min_bytes=5000", "leave no power of two"),
        ("commbench.iters=0", "commbench.iters must be an integer >= 1"),
        ("commbench.mpi=true", "commbench.mpi=true needs an MPI launch"),
        ("commbench.nonsense=1", "nonsense"),
        ("dist.backend=mpi", "dist.backend must be one of auto|gloo|nccl"),
    ],
)
def test_config_mistakes_end_with_one_line(override: str, expected: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = [f"paths.root={tmp_path}", "commbench.max_bytes=4096", override]
    assert cli.run("scaling.commbench", collectives.main, "commbench", argv=argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("scaling.commbench: error:")
    assert expected in err
    assert not (tmp_path / "commbench").exists()  # no process group, no run folder


def test_help_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run("scaling.commbench", collectives.main, "commbench", argv=["--help"]) == 0
    assert "scaling.commbench" in capsys.readouterr().out


SIDE_BY_SIDE = '''
import json, statistics, sys, time
import torch, torch.distributed as dist
from scaling import cli
from scaling.bench import collectives
from scaling.launch import detect, group

settings = collectives.parse(cli.compose_config(["commbench.iters=10", "commbench.warmup_iters=2"], "commbench"))
ctx = group.init(detect.detect(), settings.dist)
size = int(sys.argv[2])
n = ctx.world_size
rounds = []
for _ in range(7):  # side by side, so that a load that comes and goes hits both alike
    case = collectives.torch_case("all_reduce", size // 4, n, ctx.device)
    bench = collectives.measure(ctx, case, "all_reduce", "torch", size, settings.bench)
    buf = torch.zeros(size // 4)
    dist.all_reduce(buf)
    dist.barrier()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - start)
    # A ring all-reduce moves 2(n-1)/n of the message through each rank's link.
    timed_busbw = size / statistics.median(times) / 1e9 * 2 * (n - 1) / n
    rounds.append({"commbench": bench.busbw_GBps, "timed": timed_busbw})
if ctx.rank == 0:
    with open(sys.argv[1], "w") as out:
        json.dump(rounds, out)
group.teardown(ctx)
'''


def test_all_reduce_bus_bandwidth_agrees_with_a_timing_of_dist_all_reduce(tmp_path: Path) -> None:
    script, out = tmp_path / "side_by_side.py", tmp_path / "rounds.json"
    script.write_text(SIDE_BY_SIDE)
    check(torchrun(2, [str(script), str(out), str(16 * 2**20)], module=None))
    rounds = json.loads(out.read_text())
    for r in rounds:
        print(f"all_reduce 16 MiB on 2 ranks: commbench {r['commbench']:.3f} GB/s, timed here {r['timed']:.3f} GB/s")
    ratios = sorted(r["commbench"] / r["timed"] for r in rounds)
    assert ratios[len(ratios) // 2] == pytest.approx(1.0, rel=0.25)
