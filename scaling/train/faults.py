"""Causes of known size, injected into a run to check that the instruments recover them.

Set through one environment variable, never through the config, so that no
experiment or override can turn it on by accident::

    SCALING_INJECT_STALL="data:0.15@rank=1"           rank 1 sleeps 0.15 s in data loading every step
    SCALING_INJECT_STALL="data:0.2@every=5"           every rank, on every 5th step (step % 5 == 0)
    SCALING_INJECT_STALL="forward:0.05@rank=0,data:0.1@every=3@rank=1"

A stall is a sleep inside the phase it names (``data``, ``forward``,
``optimizer``): the host waits, as it would for a slow file system, a slow
preprocessing step or a slower device. Each rule applies to every step the job
runs, warm-up and control steps included.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "SCALING_INJECT_STALL"
PHASES = ("data", "forward", "optimizer")


@dataclass(frozen=True)
class Stall:
    phase: str
    seconds: float
    rank: int | None = None
    every: int = 1

    def applies(self, rank: int, step: int) -> bool:
        return (self.rank is None or self.rank == rank) and step % self.every == 0


def parse(spec: str) -> list[Stall]:
    """``PHASE:SECONDS[@rank=R][@every=K]``, comma-separated."""
    stalls = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        head, *options = part.split("@")
        phase, _, seconds = head.partition(":")
        if phase not in PHASES:
            raise ValueError(f"{ENV}: phase {phase!r} is not one of {'|'.join(PHASES)} in {part!r}")
        fields: dict[str, int] = {}
        for option in options:
            key, _, value = option.partition("=")
            if key not in ("rank", "every") or not value.isdigit():
                raise ValueError(f"{ENV}: option {option!r} must be rank=R or every=K in {part!r}")
            fields[key] = int(value)
        stalls.append(Stall(phase, float(seconds), fields.get("rank"), max(1, fields.get("every", 1))))
    return stalls


class Injector:
    """Sleeps where a rule says; does nothing (one dictionary lookup) when no rule is set."""

    def __init__(self, rank: int, stalls: list[Stall]) -> None:
        self.rank = rank
        self.by_phase: dict[str, list[Stall]] = {}
        for stall in stalls:
            self.by_phase.setdefault(stall.phase, []).append(stall)

    @classmethod
    def from_env(cls, rank: int) -> Injector:
        return cls(rank, parse(os.environ.get(ENV, "")))

    def __bool__(self) -> bool:
        return bool(self.by_phase)

    def stall(self, phase: str, step: int) -> None:
        for rule in self.by_phase.get(phase, ()):
            if rule.applies(self.rank, step):
                time.sleep(rule.seconds)
