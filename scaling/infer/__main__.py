"""``python -m scaling.infer +exp=NAME infer.batch_sizes=[1,2,4] [overrides]``."""

import sys

from scaling import compat


def main() -> int:
    compat.exit_if_unsupported("scaling.infer")  # before anything imports torch
    from scaling import cli
    from scaling.infer import job

    return cli.run("scaling.infer", job.main, config_name="infer")


if __name__ == "__main__":
    sys.exit(main())
