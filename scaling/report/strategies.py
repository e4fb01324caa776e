"""Studies that differ in ``dist.strategy`` (ddp, zero1, fsdp), compared in plain words.

At every world size with a peer that the compared studies share, each strategy's model state per rank
(``memory.max.model_state``: parameters, gradients, optimizer state, the largest rank's) as a share of
DDP's, measured, with run.json ``memory_model``'s prediction beside it (the strategy's predicted model
state over the same prediction's ``ddp_model_state``), and its step time against DDP's (``T(N)``, the
median over repeats). Without a DDP study the measured share is of the DDP replica ``memory_model``
predicts, and step times are set against the first study's.

Studies that also differ in other keys (a link, a bucket size, the machine) are grouped by those keys'
values, strategies compared within each group, and each group says which strategy is ahead at each
world size. Every input is a median over repeats from the records; nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scaling.report.configdiff import KeyDiff
from scaling.report.findings import mib, pct, procs
from scaling.report.metrics import SizeStats, StudyStats

STRATEGY_KEY = "dist.strategy"
REFERENCE = "ddp"
UNMEASURED_KEYS = ("logger.", "run.git_commit")


def differ(studies: Sequence[StudyStats]) -> bool:
    return len({st.strategy for st in studies}) > 1


def label_studies(studies: Sequence[StudyStats]) -> None:
    """Where the studies differ in strategy, figures and tables name it beside a study name that does not."""
    if not differ(studies):
        return
    for st in studies:
        if st.strategy not in st.name:
            st.label = f"{st.name} ({st.strategy})"


@dataclass(frozen=True)
class Group:
    """Studies alike in everything that changes the measurement but the strategy."""

    setting: str
    """The other differing keys' values, ``key=value, ...``; empty when the strategy is all that differs."""
    studies: tuple[StudyStats, ...]


def other_keys(diffs: Sequence[KeyDiff]) -> list[KeyDiff]:
    """Keys that change what is measured besides the strategy: the hosts (another link) count, the logger and
    the git commit do not."""
    return [d for d in diffs if d.key != STRATEGY_KEY and not d.key.startswith(UNMEASURED_KEYS)]


def groups(studies: Sequence[StudyStats], diffs: Sequence[KeyDiff]) -> list[Group]:
    other = other_keys(diffs)
    found: dict[tuple[str, ...], list[StudyStats]] = {}
    for st in studies:
        found.setdefault(tuple(d.values.get(st.name, "(unset)") for d in other), []).append(st)
    return [Group(", ".join(f"{d.key}={v}" for d, v in zip(other, values)), tuple(members))
            for values, members in found.items()]


def shared_sizes(studies: Sequence[StudyStats]) -> list[int]:
    sizes = [{s.world_size for s in st.sizes} for st in studies]
    return sorted(set.intersection(*sizes)) if sizes else []


def _speed(t: float, reference: float) -> str:
    ratio = t / reference
    return f"{ratio:.2f}x slower" if ratio >= 1 else f"{1 / ratio:.2f}x faster"


def memory_text(size: SizeStats, reference: SizeStats | None, name: str | None) -> str | None:
    """"holds 50% of ddp's model state per rank (predicted 50%)": measured against the reference study's
    (``name``), or without one against the DDP replica memory_model predicts."""
    if size.model_state_bytes is None:
        return None
    notes = []
    if reference is not None and name is not None:
        if not reference.model_state_bytes:
            return None
        share, whose = size.model_state_bytes / reference.model_state_bytes, f"{name}'s"
    elif size.predicted_ddp_model_state_bytes:
        share, whose = size.model_state_bytes / size.predicted_ddp_model_state_bytes, "a DDP replica's"
        notes.append(f"the replica {mib(size.predicted_ddp_model_state_bytes)} by memory_model")
    else:
        return None
    if size.predicted_model_state_bytes is not None and size.predicted_ddp_model_state_bytes:
        notes.append(f"predicted {pct(size.predicted_model_state_bytes / size.predicted_ddp_model_state_bytes)}")
    return f"holds {pct(share)} of {whose} model state per rank" + (f" ({'; '.join(notes)})" if notes else "")


def size_sentence(studies: Sequence[StudyStats], n: int) -> str | None:
    """Model state per rank against DDP's and the step time, for each non-DDP strategy at ``n`` processes."""
    reference = next((st for st in studies if st.strategy == REFERENCE), None)
    base = reference or studies[0]
    base_size = base.size(n)
    if base_size is None:
        return None
    parts = []
    for st in studies:
        size = st.size(n)
        if st is reference or size is None:
            continue
        memory = memory_text(size, base_size if reference else None, reference.strategy if reference else None)
        speed = None
        if st is not base:
            speed = (f"runs {_speed(size.step_s.median, base_size.step_s.median)} than {base.strategy} "
                     f"({size.step_s.median:.4f} s vs {base_size.step_s.median:.4f} s per step)")
        said = " and ".join(p for p in (memory, speed) if p)
        if said:
            parts.append(f"{st.strategy} {said}")
    if not parts:
        return None
    return f"At {procs(n)} " + "; ".join(parts) + "."


def _sizes(ns: Sequence[int]) -> str:
    """2 | 2 and 4 | 2, 4 and 8"""
    text = ", ".join(map(str, ns[:-1]))
    return f"{text} and {ns[-1]}" if text else str(ns[-1])


def ahead_sentence(group: Group) -> str | None:
    """Which strategy has the shortest step at each shared world size with a peer."""
    sizes = [n for n in shared_sizes(group.studies) if n > 1]
    if not sizes:
        return None
    fastest = {n: min(group.studies, key=lambda st: st.size(n).step_s.median).strategy for n in sizes}
    order = list(dict.fromkeys(fastest.values()))
    spans = [f"{strategy} at {_sizes([n for n in sizes if fastest[n] == strategy])}" for strategy in order]
    if len(order) == 1:
        where = procs(sizes[0]) if len(sizes) == 1 else f"every shared world size ({_sizes(sizes)} processes)"
        return f"{order[0]} is ahead at {where}"
    return f"{spans[0].replace(' at ', ' is ahead at ', 1)} processes, {', '.join(spans[1:])}"


def comparison(studies: Sequence[StudyStats], diffs: Sequence[KeyDiff]) -> list[str]:
    """The strategy findings of a comparison; none when the studies run one strategy."""
    if not differ(studies):
        return []
    found = [g for g in groups(studies, diffs) if len({st.strategy for st in g.studies}) > 1]
    out = []
    if not found:  # every other setting differs along with the strategy: compare them anyway, and say so
        mixed = ", ".join(d.key for d in other_keys(diffs))
        found = [Group("", tuple(studies))]
        out.append(f"The strategies are not compared alone: the studies differ in {mixed} too, so the differences "
                   "below are not the strategy's alone.")
    several = len(found) > 1 or any(g.setting for g in found)
    for group in found:
        head = f"With {group.setting}: " if several and group.setting else ""
        sizes = shared_sizes(group.studies)
        said = [s for s in (size_sentence(group.studies, n) for n in sizes if n > 1) if s]
        if not said and sizes == [1]:
            said = ["At 1 process every strategy trains unwrapped (no peer to shard over): run 2 processes or "
                    "more to compare them."]
        out += [head + (s[0].lower() + s[1:] if head else s) for s in said]
        ahead = ahead_sentence(group) if several else None
        if ahead:
            out.append(f"{head}{ahead}." if head else f"{ahead[0].upper()}{ahead[1:]}.")
    return out
