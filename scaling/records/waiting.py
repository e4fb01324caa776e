"""Waiting for slower ranks: one straggler, or ranks taking turns (skew)?

In every step some rank arrives last at the collective and the others wait for
it (``comm_wait_s``). That waiting has two very different causes:

- a **straggler**: the same rank is late step after step (a slow node, a rank
  with more data to load); the user should go and look at that rank;
- **skew**: the rank that is late changes from step to step (jitter of the
  operating system, a shared machine, a network that is busy at random). The
  synchronisation cost is real, but no rank is to blame.

A rank is named the straggler only when all three hold:

1. it is the last to arrive (the most time of its own in the step, the
   reduction's ``slowest_rank``) significantly more often than chance: the
   exact one-sided binomial test of its count of stretches won against a
   probability of 1/N per stretch, Bonferroni-corrected for having picked the
   most frequent of N ranks (p-value = N * P(X >= k | n, 1/N)), at level
   ``STRAGGLER_LEVEL``. A stretch is a run of consecutive steps of at least
   ``STRETCH_S`` together; its winner is the rank last in most of its steps
   (a tie: no one). Steps much shorter than that are not independent draws: a
   rank that lost its core to another process stays behind for a scheduler's
   time slice or a burst of the other process's work, several short steps in a
   row;
2. its own excess time (its mean time of its own per step less the other
   ranks' mean) explains at least ``STRAGGLER_EXPLAINED`` of the other ranks'
   mean waiting;
3. the rank that waited most waited at least ``STRAGGLER_MIN_FRAC`` of the
   measured time (below that the waiting is too small to act on).

Otherwise the waiting is skew. The test treats stretches as independent draws; a
run with few of them cannot name anyone at all (with 2 ranks, 8 stretches all
won by one rank give p = 0.0078; 7 give 0.016), which is the honest answer. The level
is strict because a wrong name sends the user to the wrong node: at 0.05, one
of four 2-process runs with nothing injected on a loaded 2-core machine named
rank 0 (last in 10 of 12 steps, p = 0.039).

``summary.waiting`` in run.json holds, per rank, its last arrivals and its
excess time by phase, and the test's figures; ``summary.straggler`` is the named
rank (or null).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

STRAGGLER_PHASES = ("data", "forward", "backward", "optimizer", "other")
STRAGGLER_LEVEL = 0.01
"""The family-wise level of the last-arrival test (over the N ranks)."""
STRAGGLER_EXPLAINED = 0.5
"""The share of the other ranks' waiting that the straggler's own excess time must explain."""
STRAGGLER_MIN_FRAC = 0.10
"""Waiting for slower ranks below this share of the time (the rank that waited most) names no one."""
STRETCH_S = 0.025
"""The shortest stretch of consecutive steps counted as one draw of the last-arrival test. Steps at least this
long are each their own stretch (every stall the tests inject, 30 ms and more, is). Shorter steps are pooled:
two 2-process jobs side by side on 2 cores, with nothing injected, had steps of 5.9 ms in which rank 0 arrived
last in 11 of 12 (p = 0.0063 counted per step, 2.3 ms more backward); pooled into 2 stretches it is chance."""


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly."""
    if k <= 0:
        return 1.0
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def last_arrival_p(count: int, steps: int, world_size: int) -> float:
    """The p-value of the most frequent last arrival: ``count`` of ``steps`` against 1/N, Bonferroni over N ranks."""
    return min(1.0, world_size * binomial_tail(count, steps, 1.0 / world_size))


def draws(steps: int, stretch_count: int, won: int) -> str:
    """What the last-arrival test counted, in words: "12 steps", or the stretches too where steps were pooled."""
    if stretch_count == steps:
        return f"{steps} steps"
    return f"{steps} steps, most often in {won} of {stretch_count} stretches of at least {STRETCH_S * 1e3:.0f} ms"


def stretches(records: Sequence[dict[str, Any]], min_s: float = STRETCH_S) -> list[int | None]:
    """The winner of each stretch of consecutive steps at least ``min_s`` long together (the last ones, shorter,
    join the stretch before them): the rank that arrived last in most of its steps, None on a tie."""
    groups: list[list[int]] = []
    current: list[int] = []
    elapsed = 0.0
    for record in records:
        current.append(int(record.get("slowest_rank", -1)))
        elapsed += float(record.get("step_s") or 0.0)
        if elapsed >= min_s:
            groups.append(current)
            current, elapsed = [], 0.0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    winners: list[int | None] = []
    for group in groups:
        counts = Counter(r for r in group if r >= 0).most_common(2)
        tied = not counts or (len(counts) > 1 and counts[0][1] == counts[1][1])
        winners.append(None if tied else counts[0][0])
    return winners


def _own(totals: dict[str, list[float]], phase: str, r: int) -> float:
    """A rank's summed time of its own in a phase: the phase's collective waiting is taken out (sync broadcasts
    and FSDP's forward all-gathers from forward, ZeRO-1's broadcast from the optimizer step, the rest of the
    exposed communication from backward)."""

    def part(key: str) -> float:
        return totals[key][r] if key in totals else 0.0

    forward = part("comm_sync_s") + part("comm_allgather_fwd_exposed_s")
    optimizer = part("comm_broadcast_exposed_s")
    value = totals[f"{phase}_s"][r]
    if phase == "forward":
        value -= forward
    if phase == "optimizer":
        value -= optimizer
    if phase == "backward":
        value -= part("comm_exposed_s") - forward - optimizer
    return value


def per_rank(records: Sequence[dict[str, Any]], totals: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Each rank's last arrivals, its mean own time and waiting per step, and its excess time by phase (its
    own time in the phase less the other ranks' mean, per step)."""
    steps = len(records)
    world = len(totals["step_s"])
    counts = [0] * world
    for record in records:
        if 0 <= record.get("slowest_rank", -1) < world:
            counts[record["slowest_rank"]] += 1
    wait = totals.get("comm_wait_s", [0.0] * world)
    phases = [p for p in STRAGGLER_PHASES if f"{p}_s" in totals]
    own_phase = {p: [_own(totals, p, r) for r in range(world)] for p in phases}
    out = []
    for r in range(world):
        others = [o for o in range(world) if o != r] or [r]
        excess = {p: (own_phase[p][r] - statistics.mean(own_phase[p][o] for o in others)) / steps for p in phases}
        out.append({"rank": r, "last": counts[r], "own_s": (totals["step_s"][r] - wait[r]) / steps,
                    "wait_s": wait[r] / steps, "excess_s": excess})
    return out


def decide(records: Sequence[dict[str, Any]], totals: dict[str, list[float]] | None,
           wait_max_frac: float | None) -> dict[str, Any] | None:
    """``summary.waiting``: straggler or skew, with the figures the decision rests on; None without peers."""
    if not records or not totals or len(totals.get("step_s", ())) < 2 or "comm_wait_s" not in totals:
        return None
    ranks = per_rank(records, totals)
    world, steps = len(ranks), len(records)
    candidate = max(ranks, key=lambda r: (r["last"], r["own_s"]))
    others = [r for r in ranks if r is not candidate]
    excess = candidate["own_s"] - statistics.mean(r["own_s"] for r in others)
    others_wait = statistics.mean(r["wait_s"] for r in others)
    explained = excess / others_wait if others_wait > 0 else 0.0
    winners = stretches(records)
    won = sum(w == candidate["rank"] for w in winners)
    p_value = last_arrival_p(won, len(winners), world)
    drawn = draws(steps, len(winners), won)
    spreads = [r["own_step_s_max"] - r["own_step_s_min"] for r in records
               if r.get("own_step_s_max") is not None and r.get("own_step_s_min") is not None]
    if (wait_max_frac or 0.0) < STRAGGLER_MIN_FRAC:
        reason = f"the rank that waited most waited {100 * (wait_max_frac or 0.0):.0f}% of the time, below " \
                 f"{100 * STRAGGLER_MIN_FRAC:.0f}%"
    elif p_value > STRAGGLER_LEVEL:
        reason = (f"rank {candidate['rank']} arrived last in {candidate['last']} of {drawn}, which chance "
                  f"(1/{world}) explains (p = {p_value:.2g} > {STRAGGLER_LEVEL})")
    elif explained < STRAGGLER_EXPLAINED:
        reason = (f"rank {candidate['rank']} arrived last in {candidate['last']} of {drawn} (p = {p_value:.2g}) "
                  f"but its own excess time explains only {100 * max(explained, 0.0):.0f}% of the others' waiting")
    else:
        reason = (f"rank {candidate['rank']} arrived last in {candidate['last']} of {drawn} (p = {p_value:.2g} "
                  f"<= {STRAGGLER_LEVEL}) and its own excess time explains {100 * explained:.0f}% of the others' "
                  "waiting")
    straggler = (wait_max_frac or 0.0) >= STRAGGLER_MIN_FRAC and p_value <= STRAGGLER_LEVEL \
        and explained >= STRAGGLER_EXPLAINED
    return {
        "kind": "straggler" if straggler else "skew",
        "reason": reason,
        "candidate": candidate["rank"],
        "steps": steps,
        "stretches": len(winners),
        "stretches_won": won,
        "p_value": p_value,
        "level": STRAGGLER_LEVEL,
        "explained": explained,
        "excess_s": excess,
        "wait_s": statistics.mean(r["wait_s"] for r in ranks),
        "others_wait_s": others_wait,
        "own_spread_s": statistics.median(spreads) if spreads else None,
        "ranks": ranks,
    }


def straggler(waiting: dict[str, Any] | None) -> dict[str, Any] | None:
    """``summary.straggler``: the named rank, the phase where it lost its time (its largest excess) and how much
    per step, with its last arrivals; None when the waiting is skew."""
    if not waiting or waiting["kind"] != "straggler":
        return None
    rank = waiting["ranks"][waiting["candidate"]]
    excess = rank["excess_s"]
    phase = max(excess, key=excess.get) if excess else None
    return {"rank": rank["rank"], "phase": phase, "lost_s": excess[phase] if phase else None,
            "last": rank["last"], "steps": waiting["steps"], "p_value": waiting["p_value"],
            "explained": waiting["explained"]}


LIST_RANKS_UP_TO = 16
"""Up to this many ranks a sentence lists every rank's count; beyond, the ranks most often last."""


def last_arrivals(ranks: Sequence[dict[str, Any]], steps: int) -> str:
    """How often each rank arrived last, as a sentence says it: ``0/3/1 of 4 steps by rank`` up to
    ``LIST_RANKS_UP_TO`` ranks; beyond, the five most often last and the most any other rank was."""
    lasts = [int(r["last"]) for r in ranks]
    if len(lasts) <= LIST_RANKS_UP_TO:
        return f"{'/'.join(map(str, lasts))} of {steps} steps by rank"
    order = sorted(range(len(lasts)), key=lambda r: (-lasts[r], r))
    top, rest = order[:5], max((lasts[r] for r in order[5:]), default=0)
    return (", ".join(f"rank {r} in {lasts[r]}" for r in top) + f" of {steps} steps, the five most often last of "
            f"{len(lasts)} ranks (every other rank in at most {rest})")
