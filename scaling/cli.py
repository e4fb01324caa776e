"""Hydra front door shared by every command.

The config is composed with Hydra's compose API rather than ``@hydra.main`` so
that a mistake ends the program with one line naming the key (docs/contract.md,
"Failures") instead of Hydra's multi-line report, and so that Hydra never makes
an output directory or changes the working directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaling.config import ConfigError
from scaling.launch.layout import launch_rank

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: Sequence[str], config_name: str = "config") -> DictConfig:
    """The config as ``python -m scaling.<cmd> OVERRIDES`` would see it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="scaling"):
        return compose(config_name=config_name, overrides=list(overrides))


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf/ConfigError exception as one readable line."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, name = str(exc.missing_cfg_file).rpartition("/")
        options = getattr(exc, "options", None) or _group_options(group)
        valid = f"; valid: {', '.join(options)}" if options else ""
        return f"{group or 'config'}={name}: no such option{valid}"
    text = str(exc).strip()
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        text = f"{text.splitlines()[0]} {str(cause).strip().splitlines()[0]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(exc).__name__


def _group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


USAGE = """usage: {prog} [-m] [OVERRIDE ...] [--cfg job] [--info] [-h]

Hydra overrides, e.g. +exp=resnet train.steps=50 dist.bucket_cap_mb=10
  +exp=NAME      experiment overlay: {exps}
{groups}
  -m, --multirun run every combination of swept values, one after another:
                 key=a,b  key=range(1,4)  group=glob(*)  [hydra.sweep.dir=PATH]
  --cfg job      print the composed config and exit (--cfg alone: the same)
  --info         print the config search path, the chosen defaults and the overrides
  -h, --help     this text
Config files: {conf}"""

FLAGS = "-m/--multirun, --cfg job, --info, -h/--help"
CFG_PARTS = ("job", "hydra", "all")
INFO_PARTS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def usage(prog: str) -> str:
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "exp")
    lines = [f"  {g}={{{','.join(_group_options(g))}}}" for g in groups]
    return USAGE.format(prog=prog, exps=", ".join(_group_options("exp")), conf=CONF_DIR,
                        groups="config groups:\n" + "\n".join(lines))


def info(args: Sequence[str], config_name: str) -> str:
    """What ``--info`` shows: where configs come from, which option of each group was chosen, the overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="scaling"):
        cfg = compose(config_name=config_name, overrides=list(args), return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    chosen = "\n".join(f"  {group}: {option}" for group, option in sorted(choices.items())
                       if not group.startswith("hydra"))
    given = "\n".join(f"  {o}" for o in args) or "  (none)"
    return (f"Config search path:\n  {CONF_DIR} (primary config: {config_name}.yaml)\n"
            f"Defaults (group: option):\n{chosen or '  (none)'}\nOverrides:\n{given}")


class FlagError(ConfigError):
    """A command-line flag this program does not take."""


def split_flags(args: Sequence[str]) -> tuple[list[str], dict[str, str | None]]:
    """The overrides, and the flags among the arguments (-m, --cfg [job], --info [part], -h)."""
    overrides: list[str] = []
    flags: dict[str, str | None] = {}
    items = list(args)
    while items:
        arg = items.pop(0)
        if arg in ("-h", "--help"):
            flags["help"] = None
        elif arg in ("-m", "--multirun"):
            flags["multirun"] = None
        elif arg in ("-c", "--cfg"):
            part = items.pop(0) if items and items[0] in CFG_PARTS else "job"
            if part != "job":
                raise FlagError(f"--cfg {part}: this program composes without Hydra's own config (no output "
                                "folder, no change of working directory); use --cfg job")
            flags["cfg"] = part
        elif arg in ("-i", "--info"):
            flags["info"] = items.pop(0) if items and items[0] in INFO_PARTS else "all"
        elif arg == "--resolve":
            continue  # --cfg job prints the resolved config already
        elif arg.startswith("-") and "=" not in arg:
            raise FlagError(f"unknown flag {arg}; supported: {FLAGS}")
        else:
            overrides.append(arg)
    return overrides, flags


def run(prog: str, main: Callable[[DictConfig], int | None], config_name: str = "config",
        argv: Sequence[str] | None = None, multirun: Callable[[list[str]], int] | None = None) -> int:
    """Compose the config from ``argv`` and call ``main``; configuration errors become one line.

    ``multirun``: what ``-m`` runs, given the overrides (scaling.sweep); without it ``-m`` is refused."""
    try:
        args, flags = split_flags(sys.argv[1:] if argv is None else argv)
        if "help" in flags:
            print(usage(prog))
            return 0
        if "info" in flags:
            print(info(args, config_name))
            return 0
        if "multirun" in flags and "cfg" in flags:
            raise FlagError("--cfg job prints one composed config: leave out -m and give one value per key")
        if "multirun" in flags:
            if multirun is None:
                raise FlagError(f"{prog} has no -m (multirun); sweeps are for scaling.train and scaling.study")
            return int(multirun(args) or 0)
        cfg = compose_config(args, config_name)
        if "cfg" in flags:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        return int(main(cfg) or 0)
    except (ConfigError, HydraException, OmegaConfBaseException) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" and not isinstance(exc, FlagError):
            raise
        if launch_rank() == 0:
            print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
