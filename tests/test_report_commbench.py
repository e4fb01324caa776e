"""``python -m scaling.report STUDY --commbench PATH``: the study's all-reduce as a share of commbench's.

The arithmetic is checked on numbers worked out by hand; the command end to end on a
real 2-rank commbench (torchrun, gloo) and the real tiny strong study of tests/shared_runs.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path

import pytest

from scaling.bench import commfit
from scaling.report import commbench_share
from scaling.report.__main__ import main as report_main
from scaling.report.study_folder import RunRecord
from tests.jobs import PNG_SIGNATURE, check, explain, only_run_dir, read_run, run_command, torchrun
from tests.shared_runs import copy_study

POINTS = ((524288, 0.4), (1048576, 0.8), (2097152, 0.9))


def ring_fit(world_size: int) -> commfit.Fit:
    """alpha = 100 us, B = 1 GB/s."""
    return commfit.Fit("all_reduce", "torch", world_size, alpha_s=1e-4, bandwidth_GBps=1.0, rms_rel_error=0.0)


# -- the arithmetic, by hand ------------------------------------------------------------------


def test_mean_bucket_is_bytes_per_all_reduce_call():
    assert commbench_share.mean_bucket_bytes(3e6, 3) == 1e6
    with pytest.raises(ValueError):
        commbench_share.mean_bucket_bytes(3e6, 0)


def test_fraction_of_the_fitted_ring_model_two_ranks():
    # n = 2, S = 1 MB: t = 2(n-1)*alpha + 2(n-1)/n * S/B = 2e-4 + 1e-3 = 1.2e-3 s;
    # busbw = 2(n-1)/n * S / t = 1e6 / 1.2e-3 = 0.8333 GB/s; 0.5 GB/s reached is 60% of it.
    at = commbench_share.at_bucket(0.5, 1e6, ring_fit(2), POINTS)
    assert at.model_GBps == pytest.approx(1 / 1.2, rel=1e-12)
    assert at.reference_GBps == at.model_GBps
    assert at.fraction == pytest.approx(0.6, rel=1e-12)
    assert (at.nearest_bytes, at.nearest_GBps) == (1048576, 0.8)  # 2^20 is the nearest power of two to 1e6
    assert not at.extrapolated


def test_fraction_of_the_fitted_ring_model_four_ranks():
    # n = 4, S = 1 MB: t = 6*1e-4 + 1.5*1e-3 = 2.1e-3 s; busbw = 1.5e6 / 2.1e-3 = 0.7143 GB/s; 0.5 is 70%.
    at = commbench_share.at_bucket(0.5, 1e6, ring_fit(4), POINTS)
    assert at.model_GBps == pytest.approx(1.5 / 2.1, rel=1e-12)
    assert at.fraction == pytest.approx(0.7, rel=1e-12)


def test_without_a_fit_the_nearest_measured_size_is_the_reference():
    at = commbench_share.at_bucket(0.5, 1e6, None, POINTS)
    assert at.model_GBps is None and at.reference_GBps == 0.8
    assert at.fraction == pytest.approx(0.625, rel=1e-12)


def test_a_bucket_beyond_the_measured_sizes_is_marked_extrapolated():
    at = commbench_share.at_bucket(0.5, 8e6, ring_fit(2), POINTS)
    assert at.extrapolated and at.nearest_bytes == 2097152
    # t = 2e-4 + 8e-3 = 8.2e-3 s; busbw = 8e6 / 8.2e-3 = 0.9756 GB/s
    assert at.model_GBps == pytest.approx(8 / 8.2, rel=1e-12)


def bench(world_size: int, backend: str = "gloo", nodes: int = 1) -> commbench_share.Bench:
    return commbench_share.Bench(Path(f"runs/commbench/cb-n{world_size}/commbench.json"), f"cb-n{world_size}", backend,
                           world_size, nodes, POINTS, ring_fit(world_size), None)


def run_record(world_size: int, busbw_GBps: float, comm_bytes: float, comm_buckets: float) -> RunRecord:
    summary = {"step_s": 0.1, "samples_per_s": 10.0, "busbw_GBps": busbw_GBps, "comm_bytes": comm_bytes,
               "comm_buckets": comm_buckets}
    return RunRecord(study="s", folder=Path(f"runs/s/n{world_size}-r0"), status="completed", world_size=world_size,
                     nodes=1, repeat=0, batch_per_rank=4, global_batch=4 * world_size, threads_per_process=1,
                     summary=summary, memory_max={}, error=None, run={"backend": "gloo"}, config={},
                     measured_steps=3)


def test_the_printed_line_names_reached_reference_fraction_bucket_and_commbench():
    runs = [run_record(2, 0.5, 3e6, 3), run_record(4, 0.5, 3e6, 3)]
    lines = commbench_share.study_lines(commbench_share.compare_study("s", runs, [bench(2)]))
    assert lines[0] == ("n2: all-reduce reached 0.5 GB/s, 60% of commbench's 0.83 GB/s at 1.0 MB buckets "
                        "(fitted model; measured 0.8 GB/s at 1.0 MB; runs/commbench/cb-n2)")
    assert lines[1].startswith("n4: no commbench result with world size 4 and backend gloo among those given "
                               "(2 ranks on gloo, 1 node(s) (runs/commbench/cb-n2))")


def compressed_run(summary: dict, hook: str) -> RunRecord:
    full = {"step_s": 0.1, "samples_per_s": 10.0, **summary}
    return RunRecord(study="s", folder=Path("runs/s/n2-r0"), status="completed", world_size=2, nodes=1, repeat=0,
                     batch_per_rank=4, global_batch=8, threads_per_process=1, summary=full, memory_max={}, error=None,
                     run={"backend": "gloo", "comm_hook": hook}, config={}, measured_steps=3)


def test_a_compressing_hook_is_measured_by_the_bytes_it_sent():
    """fp16 sends 1 MB for 2 MB of gradients, in 2 buckets (0.5 MB per call), busy 2 ms: 0.5 GB/s at n = 2.

    commbench's model at 0.5 MB: t = 2e-4 + 0.5e6/1e9 = 7e-4 s, busbw = 0.5e6 / 7e-4 = 0.714 GB/s: 70%.
    Counting gradient bytes would claim 1 GB/s at 1 MB buckets, 120% of the benchmark's 0.833 GB/s there.
    """
    wire = compressed_run({"comm_bytes": 2e6, "comm_wire_bytes": 1e6, "comm_buckets": 2, "busbw_GBps": 0.5}, "fp16")
    # A record from before comm_wire_bytes: busbw was computed from the gradient bytes.
    older = compressed_run({"comm_bytes": 2e6, "comm_buckets": 2, "busbw_GBps": 1.0}, "fp16")
    for run in (wire, older):
        assert run.busbw_GBps() == pytest.approx(0.5, rel=1e-12)
        assert commbench_share.run_bucket_bytes(run) == pytest.approx(0.5e6, rel=1e-12)
        _, at = commbench_share.per_run(run, [bench(2)])
        assert at.fraction == pytest.approx(0.7, rel=1e-12)


def test_powersgd_without_wire_bytes_is_not_compared():
    older = compressed_run({"comm_bytes": 2e6, "comm_buckets": 2, "busbw_GBps": 1.0}, "powersgd")
    assert older.busbw_GBps() is None
    (line,) = commbench_share.study_lines(commbench_share.compare_study("s", [older], [bench(2)]))
    assert "lack comm_wire_bytes" in line and "powersgd" in line


def test_only_the_same_backend_matches_and_the_same_node_count_is_preferred():
    two_nodes, one_node, nccl = bench(2, nodes=2), bench(2, nodes=1), bench(2, backend="nccl")
    assert commbench_share.match([nccl, two_nodes, one_node], 2, "gloo", 1) is one_node
    assert commbench_share.match([nccl, two_nodes], 2, "gloo", 1) is two_nodes
    assert commbench_share.match([nccl], 2, "gloo", 1) is None


def test_a_missing_commbench_path_is_one_line(tmp_path, capsys):
    assert report_main([str(tmp_path), "--commbench", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and err.startswith("scaling.report: error:")


# -- end to end: a real commbench beside a real study -----------------------------------------


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cb")
    check(torchrun(2, [f"paths.root={root}", "commbench.ops=[all_reduce]", "commbench.min_bytes=1024",
                       "commbench.max_bytes=4194304", "commbench.iters=5", "commbench.warmup_iters=2"],
                   module="scaling.commbench"))
    return only_run_dir(root / "commbench")


def ring_busbw_GBps(fit: dict, world_size: int, size_bytes: float) -> float:
    """The contract's ring model t = 2(n-1)*alpha + 2(n-1)/n * S/B, as bus bandwidth 2(n-1)/n * S / t."""
    factor = 2 * (world_size - 1) / world_size
    bandwidth = math.inf if fit["bandwidth_GBps"] is None else fit["bandwidth_GBps"] * 1e9
    return factor * size_bytes / (2 * (world_size - 1) * fit["alpha_s"] + factor * size_bytes / bandwidth) / 1e9


def test_report_states_the_share_of_commbench_bandwidth_reached(strong, bench_dir, tmp_path):
    study = copy_study(strong.dir, tmp_path / "tiny-strong")
    code = ("import sys\nfrom scaling.report.__main__ import main\n"
            "code = main([sys.argv[1], '--commbench', sys.argv[2]])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(code)\n")
    proc = run_command([sys.executable, "-c", code, str(study), str(bench_dir)], 300)
    assert proc.returncode == 0, explain(proc)

    record = json.loads((bench_dir / "commbench.json").read_text())
    fit = next(f for f in record["fit"] if (f["op"], f["transport"]) == ("all_reduce", "torch"))
    runs = {p.name: read_run(p) for p in sorted(study.glob("n2-r*"))}
    reached = statistics.median(r["summary"]["busbw_GBps"] for r in runs.values())
    bucket = statistics.median(r["summary"]["comm_wire_bytes"] / r["summary"]["comm_buckets"] for r in runs.values())
    fraction = reached / ring_busbw_GBps(fit, 2, bucket)

    line = next(x for x in proc.stdout.splitlines() if "n2: all-reduce reached" in x)
    assert f", {100 * fraction:.0f}% of commbench's " in line, line
    assert f"at {bucket / 1e6:.1f} MB buckets" in line or f"at {bucket / 1e3:.1f} kB buckets" in line, line
    assert str(bench_dir) in line
    assert "n1:" not in proc.stdout, "one process has no all-reduce to compare"

    with open(study / "results.csv", newline="") as f:
        rows = {r["run_id"]: r for r in csv.DictReader(f)}
    for run_id, run in runs.items():
        s = run["summary"]
        own = s["busbw_GBps"] / ring_busbw_GBps(fit, 2, s["comm_wire_bytes"] / s["comm_buckets"])
        assert float(rows[run_id]["busbw_vs_commbench"]) == pytest.approx(own, rel=1e-9), run_id
        assert rows[run_id]["commbench"] == str(bench_dir / "commbench.json")
    assert rows["n1-r0"]["busbw_vs_commbench"] == "" and rows["n1-r0"]["commbench"] == ""

    rel_json = os.path.relpath(bench_dir / "commbench.json", study)
    rel_png = os.path.relpath(bench_dir / "commbench.png", study)
    md = (study / "report.md").read_text()
    assert f"]({rel_json})" in md and f"]({rel_png})" in md
    assert (study / rel_png).read_bytes()[:8] == PNG_SIGNATURE
    table_row = next(x for x in md.splitlines() if x.startswith("| 2 | 4 | 8 |"))
    assert table_row.endswith(f"| {100 * fraction:.0f}% |"), "the scaling table's vs-commbench column"
    page = (study / "report.html").read_text()
    assert f'href="{rel_json}"' in page and f"{100 * fraction:.0f}% of commbench" in page
    assert page.count('src="data:image/png;base64,') == 9, "the eight study plots (the timeline's among them) and commbench's, embedded"
