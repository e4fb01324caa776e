"""``python -m scaling.train|study -m OVERRIDES``: Hydra's multirun, one combination after another.

The overrides are expanded by Hydra's own override parser and BasicSweeper
(comma lists, ``range()``, ``glob()``), every combination is composed and
checked before anything runs, and then each runs in turn: for ``scaling.train``
a normal single-process job ``python -m scaling.train``, for ``scaling.study``
a normal study (in this process, so that under Slurm it runs in the same
allocation). Everything lands in one sweep folder, ``<paths.root>/<sweep
name>`` (or ``hydra.sweep.dir=PATH``):

- a train sweep: one run folder per combination, ``<sweep>/<combination>/``,
  launcher logs under ``<sweep>/logs/``, and the sweep report (scaling.report.sweep_report);
- a study sweep: one study folder per combination, ``<sweep>/<combination>/n<N>-r<r>/``,
  and one comparison report over all of them in ``<sweep>/compare/``.

A combination's name is made from its swept values (``batch_size-4+hook-fp16``);
names that would collide get a hash of the full values. The sweep resumes: a
completed job or study is skipped, a failed or cut-short job is moved aside and
run again; a folder that holds a combination run with other settings is refused.
``sweep.json`` in the sweep folder lists the combinations and how each ended.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from scaling import cli, config
from scaling.config import ConfigError
from scaling.launch.lifetime import end_with_parent
from scaling.records.files import flatten, previous_json, read_json, write_json
from scaling.study.points import StudyInterrupted, fmt_duration, move_attempt_aside, point_state, stop_job
from scaling.study.run import EXIT_STOPPED, run_study, terminate_as_interrupt
from scaling.study.spec import (check_points, check_resumable, spec_from_config, strategy_overrides, study_settings,
                                study_strategies)

SWEEP_JSON = "sweep.json"
COMMANDS = ("train", "study")
NAME_LIMIT = 100
# Keys a sweep sets for every combination (where its records go).
OWNED_KEYS = ("paths.root", "paths.run_id", "study.name")
# Keys that may differ between a completed run and the same combination run again.
FREE_KEYS = ("paths.", "logger.", "study.name")
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Combination:
    name: str
    """Folder name, from the swept values: ``batch_size-4+hook-fp16``."""
    overrides: tuple[str, ...]
    """The user's overrides with the swept ones set to this combination's values."""
    swept: dict[str, str]
    """Swept key -> this combination's value, as written in the override."""


@dataclass(frozen=True)
class Sweep:
    command: str
    """train | study."""
    dir: Path
    swept_keys: tuple[str, ...]
    combinations: tuple[Combination, ...]
    argv: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.dir.name

    def run_overrides(self, combo: Combination) -> list[str]:
        """What the combination's job or study is started with: its own folder inside the sweep's."""
        kept = [o for o in combo.overrides if _key(o) not in OWNED_KEYS]
        if self.command == "train":
            return [*kept, f"paths.root={self.dir.parent}", f"study.name={self.name}", f"paths.run_id={combo.name}"]
        return [*kept, f"paths.root={self.dir}", f"study.name={combo.name}"]


# -- expansion --------------------------------------------------------------------------------


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand(overrides: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The swept keys and every combination's override list, by Hydra's parser and BasicSweeper."""
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3", job_name="scaling"):
        # The config loader lets glob() list a config group's options.
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        parsed = parser.parse_overrides(list(overrides))
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    swept = list(dict.fromkeys(o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()))
    return swept, batches


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each key (``batch_size``), or the whole key where two would share it."""
    last = {k: k.rsplit(".", 1)[-1].replace("/", "-") for k in keys}
    shared = {v for v in last.values() if list(last.values()).count(v) > 1}
    return {k: (k.replace("/", "-") if v in shared else v) for k, v in last.items()}


def _digest(values: dict[str, str]) -> str:
    return hashlib.sha1(repr(sorted(values.items())).encode()).hexdigest()[:6]


def name_combinations(swept: Sequence[str], batches: Sequence[Sequence[str]]) -> list[Combination]:
    """One combination per batch, named by its swept values; never two with the same name."""
    short = _short_keys(swept)
    combos = []
    for batch in batches:
        values = {_key(o): o.split("=", 1)[1] for o in batch}
        chosen = {k: values[k] for k in swept}
        parts = [f"{short[k]}-{UNSAFE.sub('-', v).strip('-') or 'empty'}" for k, v in chosen.items()]
        name = "+".join(parts) or "default"
        if len(name) > NAME_LIMIT:
            name = f"{name[:NAME_LIMIT - 7]}-{_digest(chosen)}"
        combos.append(Combination(name, tuple(batch), chosen))
    counts = {c.name: sum(1 for d in combos if d.name == c.name) for c in combos}
    return [Combination(f"{c.name}-{_digest(c.swept)}", c.overrides, c.swept) if counts[c.name] > 1 else c
            for c in combos]


def sweep_dir(command: str, first: DictConfig, swept: Sequence[str], chosen: str | None) -> Path:
    """``hydra.sweep.dir`` when given, else ``<paths.root>/<base>-sweep-<swept keys>``."""
    if chosen:
        return Path(chosen).absolute()
    base = str(first.get("exp_name", "default"))
    if command == "study" and "study.name" not in swept:
        base = str(first.study.name)
    keys = "-".join(_short_keys(swept).values()) or "none"
    return (Path(str(first.paths.root)) / UNSAFE.sub("-", f"{base}-sweep-{keys}")).absolute()


def split_hydra(args: Sequence[str]) -> tuple[list[str], str | None]:
    """The overrides without ``hydra.sweep.dir=PATH`` (the one Hydra key a sweep takes), and that path."""
    kept, chosen = [], None
    for arg in args:
        key = _key(arg)
        if key == "hydra.sweep.dir":
            chosen = arg.split("=", 1)[1].strip("'\"")
        elif key.startswith("hydra.") or key == "hydra":
            raise ConfigError(f"{key}: the only Hydra setting a sweep takes is hydra.sweep.dir=PATH (its folder)")
        else:
            kept.append(arg)
    return kept, chosen


def plan(command: str, args: Sequence[str]) -> tuple[Sweep, list[DictConfig]]:
    """Expand, name and compose every combination and check it as its job or study would; runs nothing."""
    overrides, chosen = split_hydra(args)
    swept, batches = expand(overrides)
    if not swept:
        raise ConfigError("-m was given but no override sweeps anything; list values as key=a,b "
                          "(or range(), glob())")
    owned = [k for k in swept if k in OWNED_KEYS]
    if owned:
        raise ConfigError(f"{owned[0]} is set by the sweep for each combination; it cannot be swept")
    combos = name_combinations(swept, batches)
    first = cli.compose_config(combos[0].overrides)
    if command == "study":
        if "study.strategies" in swept:
            raise ConfigError("study.strategies is not swept: list the strategies once, study.strategies=[ddp,fsdp] "
                              "(a study for each), or sweep dist.strategy=ddp,fsdp")
        strategies = study_strategies(first)
        if strategies is not None:  # the same sweep as dist.strategy=a,b (scaling.study.spec.strategy_overrides)
            chosen_dir = [f"hydra.sweep.dir={chosen}"] if chosen else []
            return plan(command, [*strategy_overrides(overrides, strategies), *chosen_dir])
    sweep = Sweep(command, sweep_dir(command, first, swept, chosen), tuple(swept), tuple(combos), tuple(args))
    check_folder(sweep)
    cfgs = []
    for combo in combos:
        try:
            cfg = cli.compose_config(sweep.run_overrides(combo))
            check_combination(sweep, combo, cfg)
        except (ConfigError, HydraException, OmegaConfBaseException) as exc:
            raise ConfigError(f"combination {combo.name}: {cli.one_line(exc)}; nothing was run") from None
        cfgs.append(cfg)
    return sweep, cfgs


def check_folder(sweep: Sweep) -> None:
    previous = previous_json(sweep.dir / SWEEP_JSON)
    if previous is None:
        return
    if previous.get("command") not in (None, sweep.command):
        raise ConfigError(f"{sweep.dir} holds a sweep of scaling.{previous.get('command')}; "
                          "choose another folder with hydra.sweep.dir=PATH")
    if previous.get("swept") not in (None, list(sweep.swept_keys)):
        raise ConfigError(f"{sweep.dir} holds a sweep over {', '.join(previous['swept'])}; "
                          "choose another folder with hydra.sweep.dir=PATH")


def earlier_combinations(sweep: Sweep) -> list[dict[str, Any]]:
    """Combinations an earlier run of the sweep folder listed and this one does not (a sweep may be extended)."""
    previous = (previous_json(sweep.dir / SWEEP_JSON) or {}).get("combinations") or []
    names = {c.name for c in sweep.combinations}
    return [c for c in previous if isinstance(c, dict) and c.get("name") not in names]


def job_settings(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten(raw).items() if not k.startswith(FREE_KEYS)}


def check_combination(sweep: Sweep, combo: Combination, cfg: DictConfig) -> None:
    """The job's or study's own checks, and, where the combination ran before, the same settings."""
    if sweep.command == "study":
        spec = spec_from_config(cfg, sweep.run_overrides(combo))
        check_resumable(spec, study_settings(check_points(spec)))
        return
    now = job_settings(config.parse(cfg).raw)
    config_yaml = sweep.dir / combo.name / "config.yaml"
    if point_state(sweep.dir / combo.name) != "completed" or not config_yaml.exists():
        return  # a failed or cut-short job is moved aside and run again
    before = job_settings(yaml.safe_load(config_yaml.read_text()) or {})
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in changed[:3])
        raise ConfigError(f"{sweep.dir / combo.name} was run with other settings ({shown}); "
                          "use the same settings to resume, or another folder with hydra.sweep.dir=PATH")


# -- running ----------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {text}", flush=True)


def write_sweep_json(sweep: Sweep, status: dict[str, str], state: str, earlier: Sequence[dict[str, Any]] = ()) -> None:
    write_json(sweep.dir / SWEEP_JSON, {
        "name": sweep.name,
        "command": sweep.command,
        "status": state,
        "swept": list(sweep.swept_keys),
        "argv": shlex.join([sys.executable, "-m", f"scaling.{sweep.command}", "-m", *sweep.argv]),
        "updated_at": time.time(),
        "combinations": [*earlier, *({"name": c.name, "swept": c.swept, "overrides": list(c.overrides),
                                      "status": status.get(c.name, "pending")} for c in sweep.combinations)],
    })


def study_done(folder: Path) -> bool:
    try:
        return read_json(folder / "study.json").get("status") == "completed"
    except ValueError:
        return False


def run_job(sweep: Sweep, combo: Combination, stamp: str) -> tuple[str, str]:
    """One combination of a train sweep: ``python -m scaling.train``; its status and a result line."""
    run_dir = sweep.dir / combo.name
    log_path = sweep.dir / "logs" / f"{combo.name}.log"
    if point_state(run_dir) == "incomplete":
        move_attempt_aside(run_dir, log_path, stamp)
        say(f"{combo.name}: an earlier attempt failed or was cut short; moved aside, running again")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "scaling.train", *sweep.run_overrides(combo)]
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=end_with_parent())
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # Ctrl-C reached the job as well: it records why it stopped
            raise
        except StudyInterrupted as exc:  # a scheduler's stop reached the sweep alone: pass it on once
            stop_job(proc, exc.signum, run_dir)
            raise
    took = f"in {fmt_duration(time.monotonic() - started)}"
    if returncode == 0 and point_state(run_dir) == "completed":
        summary = read_json(run_dir / "run.json").get("summary") or {}
        step_s, bound = summary.get("step_s"), summary.get("bound")
        detail = f": median step {step_s:.4f} s, {bound}-bound" if isinstance(step_s, (int, float)) else ""
        return "completed", f"completed {took}{detail}"
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return "failed", f"FAILED {took} (exit {returncode}): {lines[-1][:200] if lines else ''}  (log: {log_path})"


def execute(sweep: Sweep, cfgs: Sequence[DictConfig]) -> int:
    total = len(sweep.combinations)
    status: dict[str, str] = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    earlier = earlier_combinations(sweep)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    say(f"{sweep.name}: {total} combination(s) of {', '.join(sweep.swept_keys)} with scaling.{sweep.command}, "
        f"one after another; records: {sweep.dir}")
    write_sweep_json(sweep, status, "running", earlier)
    try:
        with terminate_as_interrupt():
            code = run_all(sweep, cfgs, status, earlier, stamp)
    except StudyInterrupted as exc:
        write_sweep_json(sweep, status, "interrupted", earlier)
        say(f"stopped by {exc}; run the same command again to continue (completed combinations are kept)")
        return EXIT_STOPPED
    except KeyboardInterrupt:
        write_sweep_json(sweep, status, "interrupted", earlier)
        say("interrupted; run the same command again to continue (completed combinations are kept)")
        return 130
    if code:
        return code
    failed = [name for name, s in status.items() if s == "failed"]
    write_sweep_json(sweep, status, "failed" if failed else "completed", earlier)
    report(sweep)
    if failed:
        print(f"\nsweep {sweep.name}: {len(failed)} combination(s) failed: {', '.join(failed)}",
              file=sys.stderr, flush=True)
    ran = sum(1 for s in status.values() if s != "skipped")
    say(f"{sweep.name}: {ran} run, {total - ran} completed earlier and skipped")
    return 1 if failed else 0


def run_all(sweep: Sweep, cfgs: Sequence[DictConfig], status: dict[str, str], earlier: Sequence[dict[str, Any]],
            stamp: str) -> int:
    """Every combination in turn; 0, or the exit status of a study that was stopped (the sweep stops too)."""
    total = len(sweep.combinations)
    for index, (combo, cfg) in enumerate(zip(sweep.combinations, cfgs), start=1):
        head = f"[{sweep.command} {index}/{total}] {combo.name}"
        folder = sweep.dir / combo.name
        if sweep.command == "train":
            if point_state(folder) == "completed":
                status[combo.name] = "skipped"
                print(f"{head}: completed earlier, skipped", flush=True)
                continue
            print(f"{head}: {' '.join(f'{k}={v}' for k, v in combo.swept.items())}", flush=True)
            status[combo.name], line = run_job(sweep, combo, stamp)
            print(f"    {combo.name} {line}", flush=True)
        else:
            if study_done(folder):
                status[combo.name] = "skipped"
                print(f"{head}: completed earlier, skipped", flush=True)
                continue
            print(f"{head}: {' '.join(f'{k}={v}' for k, v in combo.swept.items())}", flush=True)
            rc = run_study(cfg, sweep.run_overrides(combo), sweep=sweep.dir)
            status[combo.name] = "completed" if rc == 0 else "failed"
            if rc not in (0, 1):  # stopped (Ctrl-C, scheduler): the sweep stops with it
                write_sweep_json(sweep, status, "interrupted", earlier)
                say(f"stopped at {combo.name}; run the same command again to continue")
                return rc
        write_sweep_json(sweep, status, "running", earlier)
    return 0


def report(sweep: Sweep) -> None:
    if sweep.command == "study":
        from scaling.report import build_report, console_text

        from scaling.report import sweep_report

        result = build_report(sweep_report.study_folders(sweep.dir), sweep.dir / "compare")
        print("\n" + console_text(result), flush=True)
    else:
        from scaling.report import sweep_report

        print("\n" + sweep_report.console_text(sweep_report.build(sweep.dir)), flush=True)


def run(command: str, args: Sequence[str]) -> int:
    """``-m``: plan every combination (any mistake is a ConfigError before anything runs), then run them."""
    if command not in COMMANDS:
        raise ConfigError(f"-m (multirun) is for scaling.train and scaling.study, not scaling.{command}")
    if command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("-m runs each combination as a job of its own: start the sweep without a launcher "
                          "(python -m scaling.train -m ...), or sweep multi-process jobs with "
                          "python -m scaling.study -m study=weak study.nprocs=[N] ...")
    sweep, cfgs = plan(command, args)
    return execute(sweep, cfgs)
