"""An exception as one line, for records (run.json ``error``) and warnings.

Configuration mistakes have their own front door (``scaling.cli.one_line``, which
knows Hydra's exceptions); everything else is said with ``describe``.
"""

from __future__ import annotations

import re

WRAPPER = re.compile(r"^(?:\w+Error: )?Got the following error when running the callback: ")
SOURCE_LOCATION = re.compile(r"\[[^\]]*\.(?:cc|cpp|h):\d+\] ")


def describe(exc: BaseException, limit: int | None = None) -> str:
    """The exception type and the first line of its message (at most ``limit`` characters of it),
    without torch's wrappers."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C / SIGINT)"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    while WRAPPER.search(message):
        message = WRAPPER.sub("", message)
    message = SOURCE_LOCATION.sub("", message).split(". This is typically")[0]
    message = message.removeprefix(f"{type(exc).__name__}: ")[:limit]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
