"""What differs between studies: the flattened config.yaml of every run, plus the machine.

Keys that legitimately vary from point to point (the run id, the study's own
name and size list, the per-point batch) are ignored; every other key whose
value is not the same in every study is named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from scaling.report.study_folder import RunRecord, StudyRecords

# The batch keys stay: within a study they are fixed (the per-point batch is in run.json,
# not config.yaml), and two studies with different batches differ for real.
PER_POINT_KEYS = ("paths.run_id", "paths.root", "study.name", "study.nprocs", "study.repeats", "study.fail_fast")
# Where the runs ran, from run.json: a "machine" difference is as real as a config one.
RUN_KEYS = {
    "run.backend": ("backend",),
    "run.device": ("device",),
    "run.launcher": ("launcher",),
    "run.threads_per_process": ("threads_per_process",),
    "run.hosts": ("provenance", "hostnames"),
    "run.torch": ("provenance", "torch"),
    "run.git_commit": ("provenance", "git_commit"),
}


# Listed after the keys that change what is measured.
BOOKKEEPING_KEYS = ("logger.", "run.git_commit", "run.hosts")


@dataclass(frozen=True)
class KeyDiff:
    key: str
    values: dict[str, str]
    """study name -> value (several values joined when the study's runs disagree)."""


def _dig(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def run_settings(run: RunRecord) -> dict[str, str]:
    settings = {k: _show(v) for k, v in run.config.items() if k not in PER_POINT_KEYS}
    for key, path in RUN_KEYS.items():
        value = _dig(run.run, path)
        if value is not None:
            settings[key] = _show(value)
    return settings


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def study_settings(study: StudyRecords) -> dict[str, set[str]]:
    values: dict[str, set[str]] = {}
    runs = [r for r in study.runs if r.config] or study.runs
    for run in runs:
        for key, value in run_settings(run).items():
            values.setdefault(key, set()).add(value)
    for run in runs:  # a key absent from some runs is a difference too
        settings = run_settings(run)
        for key in values:
            if key not in settings:
                values[key].add("(unset)")
    return values


def differing_keys(studies: list[StudyRecords]) -> list[KeyDiff]:
    """Keys whose values differ between the studies (or within one of them)."""
    per_study = {s.name: study_settings(s) for s in studies}
    keys = sorted(set().union(*per_study.values())) if per_study else []
    out = []
    for key in keys:
        sets = {name: values.get(key, {"(unset)"}) for name, values in per_study.items()}
        distinct = {frozenset(v) for v in sets.values()}
        if len(distinct) > 1 or any(len(v) > 1 for v in sets.values()):
            out.append(KeyDiff(key, {name: " | ".join(sorted(v)) for name, v in sets.items()}))
    return sorted(out, key=lambda d: (d.key.startswith(BOOKKEEPING_KEYS), d.key))


def common_settings(study: StudyRecords) -> dict[str, str]:
    """The settings every run of the study shares (for the report's configuration section)."""
    return {k: next(iter(v)) for k, v in sorted(study_settings(study).items()) if len(v) == 1}
