"""Ceilings probed once per host, device, precision, threads and processes, kept on disk.

One JSON file per probe under ``$XDG_CACHE_HOME/scaling`` (``~/.cache/scaling``);
written atomically, so processes probing at once never leave a torn file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_path(name: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "scaling" / f"{name}.json"


def lookup(name: str, key: str) -> Any:
    """The value stored under ``key`` in the ``name`` cache, or None: nothing is probed."""
    try:
        return json.loads(cache_path(name).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def cached(name: str, key: str, probe: Callable[[], Any]) -> Any:
    """The value stored under ``key`` in the ``name`` cache, or ``probe()``'s, stored for next time."""
    path = cache_path(name)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    value = cache[key] = probe()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-probe next time
    return value
