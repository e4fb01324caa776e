"""``python -m scaling.train +exp=NAME [overrides]``."""

import sys

from scaling import compat

compat.exit_if_unsupported("scaling.train")  # before anything imports torch

from scaling import cli, sweep  # noqa: E402
from scaling.train.job import main  # noqa: E402

sys.exit(cli.run("scaling.train", main, multirun=lambda args: sweep.run("train", args)))
