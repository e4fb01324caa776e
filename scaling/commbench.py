"""``python -m scaling.commbench``: the command's name; the benchmark is ``scaling.bench.collectives``."""

import sys

from scaling import compat


def main() -> int:
    compat.exit_if_unsupported("scaling.commbench")  # before anything imports torch
    from scaling import cli
    from scaling.bench import collectives

    return cli.run("scaling.commbench", collectives.main, config_name="commbench")


if __name__ == "__main__":
    sys.exit(main())
