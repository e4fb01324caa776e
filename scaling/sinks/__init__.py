"""Where rank 0 sends what it measures, besides the records on disk.

A sink receives the run's description at the start, the aggregated step
records at each log interval, and the final run.json. Other ranks get none:
the decision is made once, when the sinks are built.
"""

from __future__ import annotations

from typing import Any, Protocol


class Sink(Protocol):
    def on_start(self, run: dict[str, Any]) -> None: ...

    def on_steps(self, records: list[dict[str, Any]]) -> None: ...

    def on_end(self, run: dict[str, Any]) -> None: ...

