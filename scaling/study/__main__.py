"""``python -m scaling.study +exp=NAME study=strong|weak [overrides]``, and ``-m`` sweeps of studies."""

import sys

from scaling import compat

compat.exit_if_unsupported("scaling.study")  # every point it runs would refuse it

from scaling import sweep  # noqa: E402
from scaling.study.run import entry  # noqa: E402

sys.exit(entry(multirun=lambda swept: sweep.run("study", swept)))
