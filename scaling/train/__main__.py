"""``python -m scaling.train +exp=NAME [overrides]``."""

import sys

from scaling import cli
from scaling.train.job import main

sys.exit(cli.run("scaling.train", main))
