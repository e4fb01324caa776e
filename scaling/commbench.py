"""``python -m scaling.commbench``: the command's name; the benchmark is ``scaling.bench.commbench``."""

import sys

from scaling import cli
from scaling.bench.commbench import main

if __name__ == "__main__":
    sys.exit(cli.run("scaling.commbench", main, config_name="commbench"))
