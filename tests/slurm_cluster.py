"""A real, throw-away Slurm cluster on this host, for tests.

Two virtual nodes (``slurmd -N n1``, ``slurmd -N n2``) share this machine, each with
its own port, spool and log; a private ``munged`` signs their messages. Everything
lives in one temporary directory and is reached through ``SLURM_CONF``, so nothing in
``/etc`` is read or changed, and a system Slurm, if any, is left alone.

Jobs are followed with ``squeue`` (``sbatch --wait`` polls slowly) and their end state
is read with ``scontrol show job`` while the controller still holds the record
(``MinJobAge``); no accounting database is needed.

Needs root (slurmd starts job steps as the submitting user) and Debian's
``slurmctld slurmd slurm-client munge`` (``scripts/install_system_deps.sh``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from scaling.launch.lifetime import end_with_parent

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


def missing_programs() -> list[str]:
    """The Slurm/munge programs that are not installed (empty when all are)."""
    path = f"{os.environ.get('PATH', '')}:{SBIN_PATH}"
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=path) is None]


def why_unusable() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    missing = missing_programs()
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing); "
                "run scripts/install_system_deps.sh as root")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd launches job steps as the submitting user)"
    return None


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Job:
    """A finished batch job as the controller last reported it."""

    job_id: int
    state: str
    """JobState, e.g. COMPLETED, FAILED, CANCELLED, TIMEOUT."""
    exit_code: int | None
    """Exit status of the batch script (None when it ended by a signal or is unknown)."""
    signal: int
    output: str
    """The job's stdout+stderr file, read after it left the queue."""
    info: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"job {self.job_id}: state {self.state}, exit {self.exit_code}, signal {self.signal}\n{self.output}"


def parse_scontrol(line: str) -> dict[str, str]:
    """``scontrol show ... -o`` output (``Key=Value`` pairs on one line) as a dict."""
    # Values may contain spaces (Command=, Comment=), so split at " Key=" boundaries.
    pairs = re.findall(r"(?:^|\s)([A-Za-z:/_]+)=(.*?)(?=\s[A-Za-z:/_]+=|$)", line.strip())
    return dict(pairs)


class SlurmCluster:
    """Controller + ``nodes`` node daemons + munged, all private to ``root``."""

    def __init__(self, root: Path | None = None, nodes: tuple[str, ...] = ("n1", "n2"),
                 cpus_per_node: int = 2, partition: str = "debug"):
        self._own_root = root is None  # a folder made here is removed by stop()
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-"))
        self.nodes = nodes
        # Each virtual node claims the host's two cores: a two-node job then runs one
        # single-threaded rank per node side by side, and a job may ask for
        # --cpus-per-task=2 to check that threads follow SLURM_CPUS_PER_TASK.
        # (SlurmdParameters=config_overrides lets the claims overlap.)
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list[Path] = []

    # ----------------------------------------------------------------- set-up
    @property
    def env(self) -> dict[str, str]:
        """An environment for Slurm client commands (and jobs) aimed at this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{env.get('PATH', '/usr/bin:/bin')}:{SBIN_PATH}"
        return env

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory=1024 State=UNKNOWN"
            for name, port in zip(self.nodes, node_ports)
        )
        self.conf.write_text(f"""\
ClusterName=scalingtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (120 s by default); a short one keeps the requeue test short.
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: track processes through /proc and leave task placement alone.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Trust the CPU counts below even where the host has fewer or more cores.
SlurmdParameters=config_overrides
ReturnToService=2
PropagateResourceLimits=NONE
JobRequeue=1
# Keep finished jobs visible to `scontrol show job` long enough to read their exit code.
MinJobAge=900
KillWait=10
InactiveLimit=0
MessageTimeout=30
SlurmdTimeout=120
{node_lines}
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _write_munge_key(self) -> Path:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        os.chmod(key.parent, 0o700)
        return key

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.root / "log" / f"{name}.stdout"
        self._logs.append(log)
        with open(log, "wb") as out:
            # The daemons end with the test run, even one killed before its fixtures could stop them.
            self._procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                 start_new_session=True, preexec_fn=end_with_parent())

    def start(self, timeout_s: float = 90) -> SlurmCluster:
        self._write_config()
        key = self._write_munge_key()
        munge_dir = self.munge_socket.parent
        self._spawn("munged", [
            shutil.which("munged", path=self.env["PATH"]) or "munged", "--foreground", "--force",
            f"--socket={self.munge_socket}", f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
            f"--log-file={self.root}/log/munged.log", f"--seed-file={munge_dir}/munged.seed",
        ])
        self._wait_for(lambda: self.munge_socket.exists(), 20, "munged socket")
        self._spawn("slurmctld", [shutil.which("slurmctld", path=self.env["PATH"]) or "slurmctld", "-D", "-i"])
        self._wait_for(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0, 40, "slurmctld")
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [shutil.which("slurmd", path=self.env["PATH"]) or "slurmd", "-D", "-N", node])
        self._wait_for(self._all_idle, timeout_s, "both nodes idle in sinfo")
        return self

    def _all_idle(self) -> bool:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while starting\n{self.logs_tail()}")
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(node) == "idle" for node in self.nodes)

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs_tail()}")

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        # Daemons run in the foreground, so their stdout holds what their log files hold.
        for log in sorted((self.root / "log").glob("*.stdout")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """``scontrol shutdown``, then make sure every daemon this cluster started is gone."""
        if "slurmctld" in self._procs:
            self._run(["scontrol", "shutdown"], check=False, timeout=30)
        deadline = time.monotonic() + 20
        for name in [n for n in self._procs if n != "munged"] + (["munged"] if "munged" in self._procs else []):
            proc = self._procs[name]
            if name == "munged":
                proc.terminate()
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._procs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- jobs
    def _run(self, argv: list[str], check: bool = True, timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=env or self.env, check=check, timeout=timeout)

    def submit(self, script: Path | str, *sbatch_args: str, env: dict[str, str] | None = None,
               output: Path | None = None, cwd: Path | None = None) -> int:
        """``sbatch [args] script`` with ``env`` added to the cluster environment; the job id."""
        full_env = {**self.env, **(env or {})}
        argv = ["sbatch", "--parsable", *sbatch_args]
        if output is not None:
            argv.append(f"--output={output}")
        proc = subprocess.run([*argv, str(script)], capture_output=True, text=True, env=full_env,
                              cwd=cwd, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict; empty once the controller forgot the job."""
        proc = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return parse_scontrol(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}

    def in_queue(self, job_id: int) -> bool:
        """Pending, running, requeued or completing (what plain ``squeue`` lists)."""
        proc = self._run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False)
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def wait(self, job_id: int, output: Path, timeout_s: float = 300, poll_s: float = 1.0) -> Job:
        """Poll ``squeue`` until the job leaves the queue; its end state and output."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while self.in_queue(job_id):
            info = self.job_info(job_id) or info
            if time.monotonic() > deadline:
                self._run(["scancel", str(job_id)], check=False)
                raise TimeoutError(f"job {job_id} still queued after {timeout_s:.0f} s: {info.get('JobState')}\n"
                                   f"{output.read_text(errors='replace') if output.exists() else '(no output)'}")
            time.sleep(poll_s)
        info = self.job_info(job_id) or info
        code, _, sig = info.get("ExitCode", ":").partition(":")
        text = output.read_text(errors="replace") if output.exists() else ""
        return Job(job_id, info.get("JobState", "UNKNOWN"), int(code) if code.isdigit() else None,
                   int(sig) if sig.isdigit() else 0, text, info)

    def run_job(self, script: Path | str, *sbatch_args: str, output: Path, env: dict[str, str] | None = None,
                cwd: Path | None = None, timeout_s: float = 300) -> Job:
        """Submit and wait: the finished job."""
        return self.wait(self.submit(script, *sbatch_args, env=env, output=output, cwd=cwd), output, timeout_s)

    def signal_batch(self, job_id: int, signame: str) -> None:
        """Send ``signame`` to the job's batch shell only, as ``--signal=B:SIG@secs`` does."""
        self._run(["scancel", "--batch", f"--signal={signame}", str(job_id)])
