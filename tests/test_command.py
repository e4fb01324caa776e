"""The ``scaling`` console command: each subcommand is the program ``python -m scaling.<command>`` runs."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.jobs import run_command

COMMAND = Path(sys.executable).parent / "scaling"  # made by pip install from [project.scripts]


def test_the_console_command_lists_its_commands_and_refuses_an_unknown_one() -> None:
    assert COMMAND.exists(), f"{COMMAND} is missing: install the package (pip install -e .)"
    help_ = run_command([str(COMMAND), "--help"], timeout_s=60)
    assert help_.returncode == 0
    listed = [line.split()[0] for line in help_.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["train", "study", "report", "predict", "infer", "commbench", "wandb-report"]
    wrong = run_command([str(COMMAND), "trian"], timeout_s=60)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "scaling: error: no command 'trian'; commands: train, study, report, predict, infer, commbench, wandb-report"]


def test_each_subcommand_gets_its_own_arguments(tmp_path: Path) -> None:
    # Hydra's commands compose the overrides given after the subcommand ...
    train = run_command([str(COMMAND), "train", "+exp=mlp", "train.steps=7", "--cfg", "job"], timeout_s=120)
    assert train.returncode == 0, train.stderr
    assert "  steps: 7\n" in train.stdout and "kind: mlp" in train.stdout
    bench = run_command([sys.executable, "-m", "scaling", "commbench", "commbench.iters=3", "--cfg", "job"],
                        timeout_s=120)
    assert bench.returncode == 0 and "iters: 3" in bench.stdout, bench.stderr
    # ... and argparse's read theirs: a missing folder is the report's own one-line error.
    missing = tmp_path / "no-such-study"
    report = run_command([str(COMMAND), "report", str(missing)], timeout_s=120)
    assert report.returncode == 2
    assert report.stderr.strip() == f"scaling.report: error: {missing} is not a directory (expected <paths.root>/<study.name>)"
