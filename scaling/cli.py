"""Hydra front door shared by every command.

The config is composed with Hydra's compose API rather than ``@hydra.main`` so
that a mistake ends the program with one line naming the key (SPEC "When things
go wrong") instead of Hydra's multi-line report, and so that Hydra never makes
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


USAGE = """usage: {prog} [OVERRIDE ...] [--cfg]

Hydra overrides, e.g. +exp=resnet train.steps=50 dist.bucket_cap_mb=10
  +exp=NAME      experiment overlay: {exps}
  --cfg          print the composed config and exit
Config files: {conf}"""


def run(prog: str, main: Callable[[DictConfig], int | None], config_name: str = "config",
        argv: Sequence[str] | None = None) -> int:
    """Compose the config from ``argv`` and call ``main``; configuration errors become one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(USAGE.format(prog=prog, exps=", ".join(_group_options("exp")), conf=CONF_DIR))
        return 0
    show = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    try:
        cfg = compose_config(args, config_name)
        if show:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        return int(main(cfg) or 0)
    except (ConfigError, HydraException, OmegaConfBaseException) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if launch_rank() == 0:
            print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
