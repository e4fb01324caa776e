"""wandb: real offline runs, read back from their .wandb files with wandb's own reader.

`wandb leet inspect --json` (wandb >= 0.30) prints the records of a run's
transaction log, the same file `wandb sync` uploads; nothing here mocks wandb.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.jobs import QUICK, TINY, check, job_env, load_run, only_run_dir, run_command, single, torchrun

pytest.importorskip("wandb")
pytest.importorskip("wandb_workspaces")
pytestmark = pytest.mark.filterwarnings("ignore:Pydantic V1 style:DeprecationWarning")  # inside wandb_workspaces

# offline named explicitly: the shared quick settings may turn wandb off for the other tests
JOB = [*TINY["mlp"], *QUICK, "data.num_samples=64", "logger.console=true", "logger.wandb.mode=offline"]
WARNING = "training goes on without wandb"


@pytest.fixture(autouse=True, scope="module")
def no_wandb_settings_from_the_shell():
    """The jobs inherit this environment: a developer's WANDB_DIR or WANDB_MODE must not move or stop the runs."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("WANDB_DIR", "WANDB_MODE", "WANDB_SERVICE", "WANDB_INIT_TIMEOUT", "WANDB_PROJECT", "WANDB_ENTITY"):
            mp.delenv(key, raising=False)
        yield


# -- reading wandb's files -----------------------------------------------------------------------

def wandb_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("run-*.wandb"))


def inspect(run_dir: Path, summary: bool = False):
    """Records of an offline run (or its final state with summary=True), by wandb's own reader."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json"] + (["--summary"] if summary else [])
    proc = run_command(cmd, 120)
    assert proc.returncode == 0, proc.stderr
    if summary:
        return json.loads(proc.stdout)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def run_record(records: list[dict]) -> dict:
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    return run


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def assert_same(got, want, where: str) -> None:
    if isinstance(want, float):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-15), \
            f"{where}: {got!r} != {want!r}"
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {got!r}"
        for key, value in want.items():
            assert_same(got.get(key), value, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def records_complete(run_dir: Path, steps_wanted: int) -> dict:
    run, steps = load_run(run_dir)
    assert run["status"] == "completed"
    assert [s["step"] for s in steps] == list(range(1, steps_wanted + 1))
    assert run["summary"]["steps"] == steps_wanted and run["summary"]["step_s"] > 0
    return run


# -- logging from training -----------------------------------------------------------------------

def test_run_names_and_the_start_up_bound(monkeypatch):
    from scaling.sinks.wandb_sink import run_name, start_timeout_s

    assert run_name("resnet", "strong", 4, "n4-r0") == "resnet-strong-n4-r0"
    assert run_name("mlp", "adhoc", 2, "mlp-n2-20250101-120000-ab12") == "mlp-n2-20250101-120000-ab12"
    # the other ranks wait in a collective while rank 0 starts wandb: stay well inside dist.timeout_s
    assert start_timeout_s(60) == 20 and start_timeout_s(25) == 10
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    assert start_timeout_s(60) == 5
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "300")
    assert start_timeout_s(60) == 24



def test_disabled_writes_nothing(tmp_path):
    root = tmp_path / "runs"
    proc = single([*JOB, f"paths.root={root}", "logger.wandb.mode=disabled"], cwd=tmp_path)
    check(proc)
    records_complete(only_run_dir(root / "adhoc"), 4)
    assert not [p for p in tmp_path.rglob("*") if "wandb" in p.name], "mode=disabled must not write wandb files"
    assert "wandb" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("case", ["dead-service", "invalid-init-timeout", "wandb-dir-under-a-file"])
def test_wandb_that_cannot_start_does_not_break_training(tmp_path, case):
    root = tmp_path / "runs"
    (tmp_path / "a-file").write_text("not a folder")
    env = {
        "dead-service": {"WANDB_SERVICE": f"3-{os.getpid()}-unix-{tmp_path / 'no-such-socket'}"},
        "invalid-init-timeout": {"WANDB_INIT_TIMEOUT": "soon"},
        # wandb falls back to $TMPDIR/wandb; what matters is that training does not notice
        "wandb-dir-under-a-file": {"WANDB_DIR": str(tmp_path / "a-file" / "wandb"), "TMPDIR": str(tmp_path / "tmp")},
    }[case]
    (tmp_path / "tmp").mkdir()
    proc = single([*JOB, f"paths.root={root}"], env=env, cwd=tmp_path)
    check(proc)
    run_dir = only_run_dir(root / "adhoc")
    records_complete(run_dir, 4)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    if case == "wandb-dir-under-a-file":
        assert not (tmp_path / "a-file").is_dir()
        return
    assert output.count(WARNING) == 1, output[-3000:]
    assert f"The records on disk in {run_dir} are complete" in output
    assert not wandb_files(tmp_path)


def test_hung_wandb_service_does_not_trip_the_other_ranks(tmp_path):
    """A service that accepts the connection and never answers: rank 0 gives up well inside dist.timeout_s."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    root = tmp_path / "runs"
    try:
        proc = torchrun(2, [*JOB, f"paths.root={root}", "dist.timeout_s=25"], cwd=tmp_path,
                        env={"WANDB_SERVICE": f"3-{os.getpid()}-tcp-localhost-{server.getsockname()[1]}"})
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    check(proc)
    assert accepted, "the job never tried the service"
    output = proc.stdout + proc.stderr
    assert output.count(WARNING) == 1 and "did not start within 10 s" in output, output[-3000:]
    records_complete(only_run_dir(root / "adhoc"), 4)
    assert not wandb_files(tmp_path)


# -- the study's comparison ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A two-point study (1 and 2 processes) with its local report and its study-level wandb run; the
    2-process run's console output in ``n2-r0.out``."""
    base = tmp_path_factory.mktemp("wbstudy")
    root = base / "runs"
    common = [*JOB, f"paths.root={root}", "study.name=wbcmp", "logger.console=false"]
    check(single([*common, "paths.run_id=n1-r0"], cwd=base))
    two = torchrun(2, [*JOB, f"paths.root={root}", "study.name=wbcmp", "paths.run_id=n2-r0",
                       "logger.wandb.tags=[cpu,tiny]"], cwd=base)
    check(two)
    folder = root / "wbcmp"
    (folder / "n2-r0.out").write_text(two.stdout)
    if importlib.util.find_spec("scaling.report") is not None:
        proc = subprocess.run([sys.executable, "-m", "scaling.report", str(folder), "--wandb"], cwd=base,
                              env=job_env(), capture_output=True, text=True, timeout=300)
    else:  # results.csv by hand, with the contract's columns (docs/contract.md) the comparison reads
        write_results_csv(folder)
        proc = subprocess.run([sys.executable, "-c", f"from scaling.report.wandb_publish import publish; "
                               f"publish([{str(folder)!r}])"], cwd=base, env=job_env(),
                              capture_output=True, text=True, timeout=300)
    check(proc)
    (folder / "publish.out").write_text(proc.stdout + proc.stderr)
    return folder


def write_results_csv(folder: Path) -> None:
    import csv

    runs = {n: load_run(folder / f"n{n}-r0")[0] for n in (1, 2)}
    base = runs[1]["summary"]["step_s"]
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study", "kind", "world_size", "repeat", "step_s", "samples_per_s", "speedup", "efficiency",
                         "compute_frac", "comm_exposed_frac", "data_frac", "other_frac", "bound", "run_id"])
        for n, run in runs.items():
            s = run["summary"]
            speedup = base / s["step_s"]
            writer.writerow(["wbcmp", "adhoc", n, 0, s["step_s"], s["samples_per_s"], speedup, speedup / n,
                             s["compute_frac"], s["comm_exposed_frac"], s["data_frac"], s["other_frac"], s["bound"],
                             run["run_id"]])


def test_two_process_job_writes_one_offline_run_with_the_records(study):
    """Rank 0 alone logs; history = steps.jsonl, summary = run.json's summary, memory and flops."""
    run_dir = study / "n2-r0"
    run, steps = load_run(run_dir)
    stdout = (study / "n2-r0.out").read_text()

    files = wandb_files(run_dir)
    assert len(files) == 1, f"one offline run expected (rank 0), found {files}"
    offline = files[0].parent
    assert offline.parent == run_dir / "wandb" and offline.name.startswith("offline-run-")
    assert f"wandb sync {offline}" in stdout

    records = inspect(offline)
    described = run_record(records)
    assert described["display_name"] == "mlp-adhoc-n2-r0"
    assert (described["run_group"], described["job_type"], described["project"]) == ("wbcmp", "adhoc", "scaling")
    assert described["tags"] == ["cpu", "tiny"]
    config = described["config"]["update"]
    assert config["train"]["steps"] == 4 and config["model"]["hidden"] == 256
    assert (config["run"]["world_size"], config["run"]["backend"], config["run"]["launcher"]) == (2, "gloo", "torchrun")
    assert_same(config["provenance"], run["provenance"], "config.provenance")

    rows = history(records)
    assert [r["step"] for r in rows] == [s["step"] for s in steps]
    for row, step in zip(rows, steps):
        assert_same({k: row.get(k) for k in step}, step, f"history step {step['step']}")
    assert any(r["type"] == "metric" and r["metric"].get("name") == "step" for r in records)

    final = inspect(offline, summary=True)
    assert (final["state"], final["exit_code"]) == ("finished", 0)
    summary = final["summary"]
    for key, value in run["summary"].items():  # the medians, not the last step's values
        assert_same(summary.get(key), value, f"summary.{key}")
    assert_same(summary["memory"], run["memory"], "summary.memory")
    assert len(summary["memory"]["per_rank"]) == 2
    assert summary["status"] == "completed"


def test_offline_publish_prints_a_sync_command_that_finds_every_run(study):
    out = (study / "publish.out").read_text()
    assert "Traceback" not in out
    assert "built but not saved (mode offline)" in out
    (sync_line,) = [line for line in out.splitlines() if line.lstrip().startswith("1. upload")]
    dirs = sync_line.split("wandb sync ", 1)[1].split()
    runs = {Path(d).parent.parent.name for d in dirs}
    assert runs == {"n1-r0", "n2-r0", "wbcmp"}, dirs  # both training runs and the study-level run
    assert f"python -m scaling.wandb_report {study} --project scaling" in out

    dry = run_command([sys.executable, "-m", "wandb", "sync", "--dry-run", *dirs], 120)
    assert dry.returncode == 0 and "Would sync 3 run(s)" in dry.stdout + dry.stderr, dry.stdout + dry.stderr


def test_study_run_holds_the_results_table_medians_and_figures(study):
    from scaling.report.wandb_publish import load_study, read_results_csv

    (offline,) = [p.parent for p in wandb_files(study / "wandb")]
    records = inspect(offline)
    described = run_record(records)
    assert (described["display_name"], described["run_group"], described["job_type"]) == \
        ("wbcmp-report", "wbcmp", "study-report")

    rows = read_results_csv(study / "results.csv")
    points = [r for r in history(records) if "world_size" in r]
    assert [p["world_size"] for p in points] == [1, 2]
    for point in points:
        (row,) = [r for r in rows if r["world_size"] == point["world_size"]]
        assert_same(point["study/samples_per_s"], float(row["samples_per_s"]), "samples_per_s")
        assert_same(point["study/efficiency"], float(row["efficiency"]), "efficiency")
    assert points[0]["study/efficiency"] == 1

    final = inspect(offline, summary=True)
    table = final["summary"]["results"]
    assert (table["_type"], table["nrows"]) == ("table-file", len(rows))
    logged = json.loads((offline / "files" / table["path"]).read_text())
    assert [r[logged["columns"].index("run_id")] for r in logged["data"]] == [r["run_id"] for r in rows]

    figures = sorted(p.stem for p in (study / "plots").glob("*.png"))
    assert figures, "the local report drew no figures"
    assert sorted(k.split("/", 1)[1] for k in final["summary"] if k.startswith("plots/")) == figures
    assert [p.stem for p in load_study(study).plots] == figures


def test_report_object_filters_on_the_group_the_runs_recorded(study):
    from wandb_workspaces import expr
    import wandb_workspaces.reports.v2 as wr

    from scaling.records.schema import SHARE_FRACS
    from scaling.report.wandb_publish import build_report, load_study

    groups = {run_record(inspect(p.parent))["run_group"] for p in wandb_files(study)}
    assert groups == {"wbcmp"}

    report = build_report([load_study(study)], project="scaling")
    assert report.id == "" and report.project == "scaling"  # built, not saved
    (grid,) = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    (runset,) = grid.runsets
    parsed = expr.expr_to_filters(runset.filters)
    leaves = parsed.filters or [parsed]
    assert [(f.key.section, f.key.name, f.op, f.value) for f in leaves] == [("run", "group", "=", "wbcmp")]

    lines = {p.title: p for p in grid.panels if isinstance(p, wr.LinePlot)}
    assert {(p.x, tuple(p.y)) for p in lines.values()} >= {("world_size", ("study/samples_per_s",)),
                                                            ("world_size", ("study/efficiency",))}
    (bars,) = [p for p in grid.panels if isinstance(p, wr.BarPlot)]
    assert list(bars.metrics) == list(SHARE_FRACS)
    (table,) = [p for p in grid.panels if isinstance(p, wr.WeavePanelSummaryTable)]
    assert table.table_name == "results"
    (media,) = [p for p in grid.panels if isinstance(p, wr.MediaBrowser)]
    assert media.media_keys == [f"plots/{p.stem}" for p in sorted((study / "plots").glob("*.png"))]
    # every panel reads keys the runs really hold
    run_summary = inspect(next(iter(wandb_files(study / "n2-r0"))).parent, summary=True)["summary"]
    assert set(SHARE_FRACS) <= set(run_summary)


def test_online_without_credentials_saves_nothing_and_exits_cleanly(study, tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "cfg"), "WANDB_DIR": str(tmp_path / "wb"),
           "NETRC": str(tmp_path / "netrc")}
    clean = {k: v for k, v in job_env(env).items() if k not in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE")}
    code = (f"from scaling.report.wandb_publish import publish; "
            f"r = publish([{str(study)!r}], mode='online'); print('URL', r.url)")
    proc = run_command([sys.executable, "-c", code], 120, env=clean)
    check(proc)
    assert "URL None" in proc.stdout and "not saved (no wandb credentials)" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    # the study run waits offline for `wandb sync`, and the command names it
    (fresh,) = [p.parent for p in wandb_files(tmp_path / "wb")]
    (sync_line,) = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("1. upload")]
    assert str(fresh) in sync_line.split()

    cli = run_command([sys.executable, "-m", "scaling.wandb_report", str(study)], 120, env=clean)
    assert cli.returncode == 1 and "wandb login" in cli.stderr and "Traceback" not in cli.stderr
