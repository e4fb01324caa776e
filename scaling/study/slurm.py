"""A study inside a Slurm allocation (``study.launcher=srun``).

Each point runs as ``srun --nodes=n --ntasks=n*ppn --ntasks-per-node=ppn ...
python -m scaling.train``; a control point as ``srun --nodes=1 --ntasks=1``.
Threads per rank follow ``--cpus-per-task``. What only Slurm knows is read
here: the allocation (node count, GPUs per node, cores per task), the address
of the first node, the job's comment (where a study started without a name
keeps it, so that a requeued job finds its study again), and whether the job
may requeue itself.

When the scheduler's early-stop signal (``#SBATCH --signal=B:USR1@<s>``)
stopped the study, a job that completed a point in this attempt and was
submitted with ``--requeue`` requeues itself and continues from the first
incomplete point; otherwise the study prints the ``sbatch`` command that
continues it (the script's environment variables of docs/contract.md, "Slurm scripts").
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from scaling.config import ConfigError
from scaling.launch.detect import slurm_master_addr, slurm_port

COMMENT_KEY = "scaling_study"
SCRIPT_VARS = ("NODES", "PROCS_PER_NODE", "EXP", "OVERRIDES", "GLOBAL_BATCH", "BATCH_PER_RANK", "REPEATS", "SWEEP")
"""The Slurm scripts' settings (besides STUDY and RUNS_ROOT) that a resubmission must repeat."""


def in_allocation(environ: Mapping[str, str] | None = None) -> bool:
    return "SLURM_JOB_ID" in (os.environ if environ is None else environ)


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def job_id() -> int:
    return _int(os.environ.get("SLURM_JOB_ID")) or 0


def allocated_nodes() -> int:
    return _int(os.environ.get("SLURM_JOB_NUM_NODES")) or _int(os.environ.get("SLURM_NNODES")) or 1


def gpus_per_node() -> int:
    """GPUs per node of the allocation ("4" or "a100:4"), or 1 without GPUs."""
    gpus = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_GPUS_PER_NODE", "").rpartition(":")[2]
    return _int(gpus) or 1


def cpus_per_task() -> int:
    return _int(os.environ.get("SLURM_CPUS_PER_TASK")) or 1


def node_counts(requested: Sequence[int] | None) -> tuple[int, ...]:
    """``study.nodes``, checked against the allocation; by default 1 2 4 ... up to it."""
    held = allocated_nodes()
    if requested is None:
        counts = []
        n = 1
        while n < held:
            counts.append(n)
            n *= 2
        return (*counts, held)
    for n in requested:
        if n > held:
            raise ConfigError(f"study.nodes has {n}, but the job holds {held} node(s); submit with --nodes={n} or more")
    return tuple(requested)


def point_command(python: str, nodes: int, procs_per_node: int, args: Sequence[str]) -> list[str]:
    """One point as a job step over ``nodes`` nodes, rank 0 on the allocation's first node."""
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes * procs_per_node}", f"--ntasks-per-node={procs_per_node}",
            f"--cpus-per-task={cpus_per_task()}", "--relative=0", "--kill-on-bad-exit=1",
            python, "-m", "scaling.train", *args]


def point_env(index: int) -> dict[str, str]:
    """Rank 0's address, the same for every point, and a port of the point's own: jobs sharing a node do not
    collide, and a point never waits for the previous point's socket to be released."""
    return {"MASTER_ADDR": os.environ.get("MASTER_ADDR") or slurm_master_addr(),
            "MASTER_PORT": str(slurm_port(job_id(), index))}


def _squeue_comment() -> str:
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id()), "-o", "%k"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return "" if out == "(null)" else out


def claim_study_name(kind: str, root: Path, say) -> str:
    """The study of this job: the one its comment names (a requeued job), else a new ``<kind>-j<job>-<time>``.

    The start time is part of the name because job ids restart; the folder is
    claimed with mkdir, so no two jobs share one.
    """
    stored = re.search(rf"{COMMENT_KEY}=([^ ,]+)", _squeue_comment())
    if stored and (root / stored.group(1)).is_dir():
        say(f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')} of job {job_id()}: "
            f"continuing study {stored.group(1)}")
        return stored.group(1)
    root.mkdir(parents=True, exist_ok=True)
    base = name = f"{kind}-j{job_id()}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 2
    while True:
        try:
            (root / name).mkdir()
            break
        except FileExistsError:
            name, suffix = f"{base}-{suffix}", suffix + 1
    comment = _squeue_comment()
    try:
        subprocess.run(["scontrol", "update", f"JobId={job_id()}", f"Comment={comment + ' ' if comment else ''}"
                        f"{COMMENT_KEY}={name}"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        say("note: could not store the study name in the job's comment; after a requeue a new study starts")
    return name


def signal_steps(signum: int) -> bool:
    """Send ``signum`` to every job step of this job (not to the batch script); True when Slurm took it."""
    try:
        subprocess.run(["scancel", f"--signal={signal.Signals(signum).name.removeprefix('SIG')}", str(job_id())],
                       capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _job_info() -> str:
    try:
        return subprocess.run(["scontrol", "show", "job", str(job_id())], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def requeue(what: str, say) -> bool:
    """Requeue this job when it was submitted with --requeue; True when it was. ``what``: "study NAME" or
    "sweep NAME", what the requeued job continues."""
    if "Requeue=1" not in _job_info():
        return False
    say(f"requeueing job {job_id()}: it continues {what} from the first incomplete point")
    try:
        subprocess.run(["scontrol", "requeue", str(job_id())], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        say(f"could not requeue job {job_id()}")
        return False
    return True


def quoted(text: str) -> str:
    """In single quotes, always: a line a user can paste into a shell."""
    return "'" + text.replace("'", "'\\''") + "'"


def resubmit_command(study: str, root: Path) -> str:
    """The ``sbatch`` command that continues the study, with the settings of this job."""
    match = re.search(r"^\s*Command=(\S+)", _job_info(), re.MULTILINE)
    script = match.group(1) if match else "<the same script>"
    settings = [f"STUDY={quoted(study)}", f"RUNS_ROOT={quoted(str(root))}"]
    settings += [f"{var}={quoted(os.environ[var])}" for var in SCRIPT_VARS if var in os.environ]
    return f"{' '.join(settings)} sbatch --nodes={allocated_nodes()} {quoted(script)}"
