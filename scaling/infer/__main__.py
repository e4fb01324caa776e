"""``python -m scaling.infer +exp=NAME infer.batch_sizes=[1,2,4] [overrides]``."""

import sys

from scaling import compat

compat.exit_if_unsupported("scaling.infer")  # before anything imports torch

from scaling import cli  # noqa: E402
from scaling.infer.job import main  # noqa: E402

sys.exit(cli.run("scaling.infer", main, config_name="infer"))
