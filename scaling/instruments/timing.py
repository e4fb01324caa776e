"""Per-step phase timing.

Keys (seconds, per rank): ``step_s`` (end of the previous step to the end of
this one), ``data_s`` (waiting for the batch, host-to-device copy included),
``forward_s`` (forward and loss), ``backward_s`` (``loss.backward()`` until every
bucket's all-reduce completed: DDP waits for them before backward returns),
``optimizer_s`` (``step()`` and ``zero_grad()``) and ``other_s`` (the rest:
the loop's own per-step bookkeeping, progress lines, the cross-rank gathers at
log intervals).

The phases are marked back to back, so ``step_s`` equals the sum of the five
parts exactly, and each part is >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scaling.instruments.clock import Clock

PHASES = ("data", "forward", "backward", "optimizer", "other")
"""Each phase ends at its mark; ``other`` ends the step."""


@dataclass
class StepMarks:
    """Raw timestamps of one step: start, then one mark after each phase."""

    start: Any
    marks: dict[str, Any]


class StepTimer:
    def __init__(self, clock: Clock, phases: tuple[str, ...] = PHASES) -> None:
        self.clock = clock
        self.phases = phases
        self._start: Any = None
        self._marks: dict[str, Any] = {}

    def restart(self) -> None:
        """Begin the next step now (after work that is not part of any step)."""
        self._start = self.clock.mark()

    def mark(self, phase: str) -> None:
        if phase in self.phases:  # phases this timer does not measure cost nothing
            self._marks[phase] = self.clock.mark()

    def finish(self) -> StepMarks:
        """End the step at the last mark; the next step starts there."""
        marks, self._marks = self._marks, {}
        step = StepMarks(self._start, marks)
        self._start = marks[self.phases[-1]]
        return step

    def resolve(self, step: StepMarks) -> dict[str, float]:
        out: dict[str, float] = {}
        previous = step.start
        for phase in self.phases:
            out[f"{phase}_s"] = self.clock.seconds_between(previous, step.marks[phase])
            previous = step.marks[phase]
        out["step_s"] = self.clock.seconds_between(step.start, step.marks[self.phases[-1]])
        return out
