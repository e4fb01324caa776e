"""``python -m scaling.commbench``: the command's name; the benchmark is ``scaling.bench.collectives``."""

import sys

from scaling import compat

compat.exit_if_unsupported("scaling.commbench")  # before anything imports torch

from scaling import cli  # noqa: E402
from scaling.bench.collectives import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.run("scaling.commbench", main, config_name="commbench"))
