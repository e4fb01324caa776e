"""``python -m scaling.train +exp=NAME [overrides]``."""

import sys

from scaling import compat


def main() -> int:
    compat.exit_if_unsupported("scaling.train")  # before anything imports torch
    from scaling import cli, sweep
    from scaling.train import job

    return cli.run("scaling.train", job.main, multirun=lambda args: sweep.run("train", args))


if __name__ == "__main__":
    sys.exit(main())
