"""Causes of known size, injected into a run to check that the instruments recover them.

Set through one environment variable, never through the config, so that no
experiment or override can turn it on by accident::

    SCALING_INJECT_STALL="data:0.15@rank=1"           rank 1 sleeps 0.15 s in data loading every step
    SCALING_INJECT_STALL="data:0.2@every=5"           every rank, on every 5th step (step % 5 == 0)
    SCALING_INJECT_STALL="forward:0.05@rank=0,data:0.1@every=3@rank=1"
    SCALING_INJECT_STALL="forward:0.03@rank=random"   one rank drawn at random each step sleeps 0.03 s

A stall is a sleep inside the phase it names (``data``, ``forward``,
``optimizer``): the host waits, as it would for a slow file system, a slow
preprocessing step or a slower device. Each rule applies to every step the job
runs, warm-up and control steps included. ``records`` is the bookkeeping of a
log interval instead: the rank's records thread sleeps before it joins the
interval's gather (a rank slow to its bookkeeping: a slow disk, a busy host),
once per interval; its step is the interval's last.

``rank=random`` draws the stalled rank anew for each step, the same draw on every
rank (a generator seeded by the step number and ``@seed=S``, default 0), so that
exactly one rank is late per step and no rank more often than chance: jitter, not
a straggler. ``random_rank(step, world_size, seed)`` tells a test which rank it was.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

ENV = "SCALING_INJECT_STALL"
PHASES = ("data", "forward", "optimizer", "records")


@dataclass(frozen=True)
class Stall:
    phase: str
    seconds: float
    rank: int | None = None
    every: int = 1
    random_rank: bool = False
    seed: int = 0

    def applies(self, rank: int, step: int, world_size: int = 1) -> bool:
        if step % self.every:
            return False
        if self.random_rank:
            return random_rank(step, world_size, self.seed) == rank
        return self.rank is None or self.rank == rank


def random_rank(step: int, world_size: int, seed: int = 0) -> int:
    """The rank a ``rank=random`` rule stalls at ``step``: the same on every rank, uniform over the ranks."""
    return random.Random(seed * 1_000_003 + step).randrange(world_size)


def parse(spec: str) -> list[Stall]:
    """``PHASE:SECONDS[@rank=R|@rank=random][@every=K][@seed=S]``, comma-separated."""
    stalls = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        head, *options = part.split("@")
        phase, _, seconds = head.partition(":")
        if phase not in PHASES:
            raise ValueError(f"{ENV}: phase {phase!r} is not one of {'|'.join(PHASES)} in {part!r}")
        fields: dict[str, int] = {}
        drawn = False
        for option in options:
            key, _, value = option.partition("=")
            if key == "rank" and value == "random":
                drawn = True
                continue
            if key not in ("rank", "every", "seed") or not value.isdigit():
                raise ValueError(f"{ENV}: option {option!r} must be rank=R, rank=random, every=K or seed=S "
                                 f"in {part!r}")
            fields[key] = int(value)
        stalls.append(Stall(phase, float(seconds), fields.get("rank"), max(1, fields.get("every", 1)), drawn,
                            fields.get("seed", 0)))
    return stalls


class Injector:
    """Sleeps where a rule says; does nothing (one dictionary lookup) when no rule is set."""

    def __init__(self, rank: int, stalls: list[Stall], world_size: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size
        self.by_phase: dict[str, list[Stall]] = {}
        for stall in stalls:
            self.by_phase.setdefault(stall.phase, []).append(stall)

    @classmethod
    def from_env(cls, rank: int, world_size: int = 1) -> Injector:
        return cls(rank, parse(os.environ.get(ENV, "")), world_size)

    def __bool__(self) -> bool:
        return bool(self.by_phase)

    def stall(self, phase: str, step: int) -> None:
        for rule in self.by_phase.get(phase, ()):
            if rule.applies(self.rank, step, self.world_size):
                time.sleep(rule.seconds)
