"""``python -m scaling.commbench``: the command's name; the benchmark is ``scaling.bench.collectives``."""

import sys

from scaling import cli
from scaling.bench.collectives import main

if __name__ == "__main__":
    sys.exit(cli.run("scaling.commbench", main, config_name="commbench"))
