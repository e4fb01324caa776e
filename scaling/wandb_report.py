"""``python -m scaling.wandb_report``: the command's name; the code is ``scaling.report.wandb_publish``."""

import sys

from scaling.report.wandb_publish import main

if __name__ == "__main__":
    sys.exit(main())
