"""``python -m scaling.infer +exp=NAME infer.batch_sizes=[1,2,4] [overrides]``."""

import sys

from scaling import cli
from scaling.infer.job import main

sys.exit(cli.run("scaling.infer", main, config_name="infer"))
