"""``python -m scaling.study +exp=NAME study=strong|weak [overrides]``."""

import sys

from scaling.study.run import entry

sys.exit(entry())
