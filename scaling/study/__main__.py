"""``python -m scaling.study +exp=NAME study=strong|weak [overrides]``, and ``-m`` sweeps of studies."""

import sys

from scaling import compat


def main() -> int:
    compat.exit_if_unsupported("scaling.study")  # every point it runs would refuse it
    from scaling import sweep
    from scaling.study.run import entry

    return entry(multirun=lambda swept: sweep.run("study", swept))


if __name__ == "__main__":
    sys.exit(main())
