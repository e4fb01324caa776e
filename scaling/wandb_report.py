"""``python -m scaling.wandb_report``: the command's name; the code is ``scaling.report.wandb``."""

import sys

from scaling.report.wandb import main

if __name__ == "__main__":
    sys.exit(main())
