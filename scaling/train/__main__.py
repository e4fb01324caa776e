"""``python -m scaling.train +exp=NAME [overrides]``."""

import sys

from scaling import cli, sweep
from scaling.train.job import main

sys.exit(cli.run("scaling.train", main, multirun=lambda args: sweep.run("train", args)))
