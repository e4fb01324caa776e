"""``study.strategies=[ddp,zero1,fsdp]``: one real study per strategy and one comparison whose finding is the
records' own ratios, and whose model-state shares are what sharding over 2 ranks must give (ZeRO-1 keeps 3/4 of
DDP's AdamW state per rank, FSDP 1/2); the strategy named in the sentences, tables, results.csv and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from scaling import sweep
from scaling.records.schema import COMM_KINDS
from scaling.report.__main__ import main as report_main
from scaling.study.run import entry
from tests.jobs import PNG_SIGNATURE, STRATEGY_MLP as JOB, check, png_size, single

STRATEGIES = ("ddp", "zero1", "fsdp")
STUDY = [*JOB, "study=weak", "study.nprocs=[1,2]", "study.controls=false", "study.name=cmp",
         f"study.strategies=[{','.join(STRATEGIES)}]"]
# AdamW in fp32 holds 4 + 4 + 8 bytes per parameter. On 2 ranks ZeRO-1 keeps half of the 8 (4 + 4 + 4 of 16),
# FSDP half of all 16: what the ranks must hold, whatever our prediction says (FSDP's padding of the head
# adds 0.1 %).
TEXTBOOK_SHARE = {"zero1": 0.75, "fsdp": 0.5}


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("strategy-study") / "runs"
    proc = single([*STUDY, f"paths.root={root}"], module="scaling.study", timeout=600)
    check(proc)
    return root / "cmp-sweep-strategy", proc


def run_json(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def started_at(folder: Path) -> dict[str, float]:
    return {str(p): run_json(p)["started_at"] for p in folder.rglob("n*-r*") if (p / "run.json").exists()}


def test_a_strategy_list_runs_one_study_per_strategy_in_one_sweep(compared) -> None:
    folder, proc = compared
    assert ("study.strategies=[ddp,zero1,fsdp]: one study per strategy, run as the sweep python -m scaling.study -m "
            in proc.stdout)
    assert proc.stdout.count("study.strategies=") == 2  # the line, and the sweep's study.strategies=null
    assert json.loads((folder / "sweep.json").read_text())["swept"] == ["dist.strategy"]
    for strategy in STRATEGIES:
        study = folder / f"strategy-{strategy}"
        assert json.loads((study / "study.json").read_text())["status"] == "completed"
        run = run_json(study / "n2-r0")
        assert (run["status"], run["strategy"], run["strategy_effective"]) == ("completed", strategy, strategy)
    table = rows(folder / "compare" / "results.csv")
    assert sorted((r["study"], r["strategy"], r["world_size"]) for r in table) == sorted(
        (f"strategy-{s}", s, n) for s in STRATEGIES for n in ("1", "2"))


def test_the_comparison_states_the_records_ratios_and_recovers_what_sharding_saves(compared) -> None:
    folder, _ = compared
    runs = {s: run_json(folder / f"strategy-{s}" / "n2-r0") for s in STRATEGIES}
    ddp = runs["ddp"]
    parts = []
    for strategy in ("zero1", "fsdp"):
        run = runs[strategy]
        share = run["memory"]["max"]["model_state"] / ddp["memory"]["max"]["model_state"]
        assert share == pytest.approx(TEXTBOOK_SHARE[strategy], abs=0.005), strategy
        predicted = run["memory_model"]["max"]["model_state"] / run["memory_model"]["ddp_model_state"]
        ratio = run["summary"]["step_s"] / ddp["summary"]["step_s"]
        speed = f"{ratio:.2f}x slower" if ratio >= 1 else f"{1 / ratio:.2f}x faster"
        parts.append(f"{strategy} holds {pct(share)} of ddp's model state per rank (predicted {pct(predicted)}) and "
                     f"runs {speed} than ddp ({run['summary']['step_s']:.4f} s vs {ddp['summary']['step_s']:.4f} s "
                     "per step)")
    sentence = "At 2 processes " + "; ".join(parts) + "."
    report = (folder / "compare" / "report.md").read_text()
    assert sentence in report
    assert sentence.replace("'", "&#x27;") in (folder / "compare" / "report.html").read_text()


def test_model_state_plot_is_drawn_where_a_strategy_shards(compared) -> None:
    folder, _ = compared
    plot = folder / "compare" / "plots" / "model_state.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and png_size(plot)[0] >= 600
    assert "![model_state](plots/model_state.png)" in (folder / "compare" / "report.md").read_text()
    assert (folder / "strategy-fsdp" / "plots" / "model_state.png").exists()
    assert not (folder / "strategy-ddp" / "plots" / "model_state.png").exists(), "a DDP study's report is as before"


def test_findings_name_each_strategys_collectives_with_its_per_kind_times(compared) -> None:
    folder, _ = compared
    findings = {s: (folder / f"strategy-{s}" / "report.md").read_text().split("## Scaling table")[0]
                for s in STRATEGIES}
    summaries = {s: run_json(folder / f"strategy-{s}" / "n2-r0")["summary"] for s in STRATEGIES}
    ddp = summaries["ddp"]
    assert (f"Gradient all-reduce at 2 processes: busy {ddp['comm_s'] * 1e3:.1f} ms per step, "
            f"{ddp['comm_exposed_s'] * 1e3:.1f} ms of it exposed") in findings["ddp"]
    assert "exposed all-reduce" in (folder / "strategy-ddp" / "report.md").read_text()
    for strategy, head, kinds in (("zero1", "All-reduce and broadcast (zero1)", {"allreduce": "gradient all-reduce",
                                                                                 "broadcast": "parameter broadcast"}),
                                  ("fsdp", "All-gather and reduce-scatter (fsdp)",
                                   {"allgather_fwd": "all-gather in forward", "allgather_bwd": "all-gather in backward",
                                    "reducescatter": "gradient reduce-scatter"})):
        s = summaries[strategy]
        assert f"{head} at 2 processes: busy {s['comm_s'] * 1e3:.1f} ms per step" in findings[strategy]
        for kind, label in kinds.items():
            assert (f"{label} {s[f'comm_{kind}_s'] * 1e3:.1f}/{s[f'comm_{kind}_exposed_s'] * 1e3:.1f} ms"
                    in findings[strategy]), (strategy, kind)
        assert "Gradient all-reduce at" not in findings[strategy]
    # The waterfall names the collectives; fsdp has no step without communication and says so.
    fsdp_report = (folder / "strategy-fsdp" / "report.md").read_text().split("## How to read")[0]
    assert "| + exposed all-gather and reduce-scatter |" in fsdp_report
    assert "fsdp gathers its parameters in every step, so no step runs without communication" in fsdp_report
    assert "exposed all-reduce" not in fsdp_report


def test_results_csv_has_the_strategy_model_state_and_every_kind_of_collective(compared) -> None:
    folder, _ = compared
    for row in rows(folder / "compare" / "results.csv"):
        run = run_json(folder / row["study"] / row["run_id"])
        assert row["strategy"] == run["strategy"]
        assert int(row["model_state_bytes"]) == run["memory"]["max"]["model_state"]
        assert int(row["predicted_model_state_bytes"]) == run["memory_model"]["max"]["model_state"]
        kinds = {"ddp": ("allreduce",), "zero1": ("allreduce", "broadcast"),
                 "fsdp": ("allgather_fwd", "allgather_bwd", "reducescatter")}[run["strategy"]]
        if run["world_size"] == 1:
            kinds = ()  # no peer: no collective of any kind
        for kind in COMM_KINDS:
            for key in (f"comm_{kind}_s", f"comm_{kind}_exposed_s", f"comm_{kind}_bytes"):
                if kind in kinds:
                    assert float(row[key]) == pytest.approx(run["summary"][key], rel=1e-12), (row["run_id"], key)
                else:
                    assert row[key] == "", (row["study"], row["run_id"], key)
    md = (folder / "compare" / "report.md").read_text()
    table = md.split("## Communication by kind")[1].split("\n## ")[0]
    assert "| strategy-fsdp | 2 | all-gather in backward |" in table
    assert "| strategy-zero1 | 2 | parameter broadcast |" in table


def test_the_same_command_again_skips_every_study(compared) -> None:
    folder, _ = compared
    before = started_at(folder)
    again = single([*STUDY, f"paths.root={folder.parent}"], module="scaling.study", timeout=300)
    check(again)
    assert again.stdout.count("completed earlier, skipped") == 3
    assert "cmp-sweep-strategy: 0 run, 3 completed earlier and skipped" in again.stdout
    assert started_at(folder) == before


@pytest.mark.parametrize("value, error", [
    ("study.strategies=[ddp,nosuch]", "study.strategies has 'nosuch'; each entry must be one of ddp|zero1|fsdp, "
                                      "e.g. study.strategies=[ddp,fsdp]"),
    ("study.strategies=[]", "study.strategies is empty; list the strategies to compare"),
    ("study.strategies=[fsdp,fsdp]", "study.strategies lists fsdp twice; give each strategy once"),
    ("study.strategies=[ddp,fsdp] dist.strategy=zero1", "study.strategies and dist.strategy are both given"),
])
def test_a_bad_strategy_list_fails_in_one_line_before_anything_runs(value, error, tmp_path, capsys) -> None:
    for multirun in ([], ["-m", "train.seed=0,1"]):
        args = [*multirun, *STUDY[:-1], *value.split(), f"paths.root={tmp_path / 'runs'}"]
        assert entry(args, multirun=lambda swept: sweep.run("study", swept)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"scaling.study: error: {error}") and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "runs").exists()


# -- wording on records written by hand: a link that differs too, and no DDP study -----------------


def hand_study(root: Path, name: str, strategy: str, hosts: list[str], step_s: dict[int, float],
               model_state: dict[int, int], predicted: dict[int, int]) -> Path:
    """A weak study at 2 and 4 processes whose runs hold what run.json says; DDP's replica is 16,000 bytes."""
    study = root / name
    study.mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"name": name, "kind": "weak", "nprocs": [2, 4], "repeats": 1}))
    for n, step in step_s.items():
        run = study / f"n{n}-r0"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"dist": {"strategy": strategy}, "train": {"batch_size": 4}}))
        (run / "run.json").write_text(json.dumps({
            "status": "completed", "world_size": n, "nodes": len(hosts), "batch_size_per_rank": 4,
            "global_batch_size": 4 * n, "threads_per_process": 1, "strategy": strategy,
            "provenance": {"hostnames": hosts},
            "summary": {"step_s": step, "samples_per_s": 4 * n / step, "compute_frac": 0.5, "comm_exposed_frac": 0.4,
                        "data_frac": 0.05, "other_frac": 0.05, "bound": "communication"},
            "memory": {"max": {"model_state": model_state[n]}},
            "memory_model": {"max": {"model_state": predicted[n]}, "ddp_model_state": 16000}}))
    return study


def test_where_the_link_differs_too_each_link_says_which_strategy_is_ahead(tmp_path, capsys) -> None:
    local, link = ["node0"], ["host0", "host1"]
    ddp_state, fsdp_state, fsdp_predicted = {2: 16000, 4: 16000}, {2: 8000, 4: 4000}, {2: 8100, 4: 4100}
    studies = [
        hand_study(tmp_path, "ddp-local", "ddp", local, {2: 0.020, 4: 0.030}, ddp_state, ddp_state),
        hand_study(tmp_path, "fsdp-local", "fsdp", local, {2: 0.030, 4: 0.045}, fsdp_state, fsdp_predicted),
        hand_study(tmp_path, "ddp-link", "ddp", link, {2: 0.100, 4: 0.200}, ddp_state, ddp_state),
        hand_study(tmp_path, "fsdp-link", "fsdp", link, {2: 0.120, 4: 0.150}, fsdp_state, fsdp_predicted),
    ]
    assert report_main([*map(str, studies), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    on_link = 'With run.hosts=["host0", "host1"]: '
    assert (f"{on_link}at 4 processes fsdp holds 25% of ddp's model state per rank (predicted 26%) and runs 1.33x "
            "faster than ddp (0.1500 s vs 0.2000 s per step).") in out
    assert f"{on_link}ddp is ahead at 2 processes, fsdp at 4." in out
    assert 'With run.hosts=["node0"]: ddp is ahead at every shared world size (2 and 4 processes).' in out
    assert ('With run.hosts=["node0"]: at 2 processes fsdp holds 50% of ddp\'s model state per rank (predicted 51%) '
            "and runs 1.50x slower than ddp (0.0300 s vs 0.0200 s per step).") in out

    # Without a DDP study: shares of the replica memory_model predicts, step times against the first study.
    zero1 = hand_study(tmp_path, "zero1-local", "zero1", local, {2: 0.025, 4: 0.035}, {2: 12000, 4: 10000},
                       {2: 12000, 4: 10000})
    assert report_main([str(zero1), str(studies[1]), "--out", str(tmp_path / "nodpp")]) == 0
    out = capsys.readouterr().out
    assert ("At 4 processes zero1 holds 62% of a DDP replica's model state per rank (the replica 15.6 KiB by "
            "memory_model; predicted 62%); fsdp holds 25% of a DDP replica's model state per rank (the replica "
            "15.6 KiB by memory_model; predicted 26%) and runs 1.29x slower than zero1 (0.0450 s vs 0.0350 s per "
            "step).") in out
    assert "fsdp-local (fsdp)" not in out, "a study named after its strategy is not labelled twice"
    assert "zero1-local" in out
