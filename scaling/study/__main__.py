"""``python -m scaling.study +exp=NAME study=strong|weak [overrides]``, and ``-m`` sweeps of studies."""

import sys

from scaling import sweep
from scaling.study.run import entry

sys.exit(entry(multirun=lambda swept: sweep.run("study", swept)))
