#!/usr/bin/env python3
"""An emulated cluster on one machine: K network namespaces as hosts, one switch, rate-limited links.

Run a job as if on K nodes joined by a network of a chosen speed, and watch it turn
communication-bound as the links get slower. Needs root (it creates network
namespaces) and iproute2 (`ip`, `tc`; `apt-get install iproute2`) and util-linux
(`unshare`).

    # any command, once per host; {placeholders} and $VARIABLES below are filled in per host
    sudo python scripts/netns_cluster.py --hosts 2 --rate 200mbit -- \\
        sh -c 'echo "host $NODE_RANK of $NNODES at $(hostname), master $MASTER_ADDR"'

    # torchrun on every host as one multi-node job (--nnodes, --node_rank, --master_addr filled in)
    sudo python scripts/netns_cluster.py --hosts 2 --rate 1gbit --mtu 9000 --torchrun -- -m scaling.commbench
    sudo python scripts/netns_cluster.py --hosts 2 --rate 100mbit --torchrun --nproc-per-node 2 -- \\
        -m scaling.train +exp=resnet study.name=slow-link

    # remove what a killed run (kill -9) left behind; runs by itself at every start too
    sudo python scripts/netns_cluster.py --cleanup

Topology. Namespace `snc<pid>-sw` holds a bridge (the switch); host i lives in
namespace `snc<pid>-h<i>` with hostname `host<i>` (its own UTS namespace, so each
rank sees K distinct nodes) and one interface `eth0`, address 198.18.0.<i+1>/24,
a veth pair to port `p<i>` of the switch. `--rate R` puts a `tc tbf` limit of R on
both directions of every host's link: upload on the host's `eth0`, download on its
switch port; so a host's link carries at most R each way, as on a non-blocking
switch with R ports. `--rate unlimited` leaves the veths unshaped.
(netem, for delay and loss, is not available on every kernel; only tbf is used.)
`--mtu 9000` gives jumbo frames: with the default 1500, TCP/IP headers and ACKs
take about 10% of a shaped link when both directions are busy, as on a real one.

Isolation. 198.18.0.0/15 is reserved for benchmarking network devices (RFC 2544).
The namespaces have no default route and the initial namespace gets no interface,
so the hosts reach each other and nothing else.

Per host the command gets: NODE_RANK, NNODES, MASTER_ADDR (host 0's address),
MASTER_PORT, NETNS_HOST, NETNS_RATE_BIT_S, GLOO_SOCKET_IFNAME=eth0 and
NCCL_SOCKET_IFNAME=eth0; and in its arguments {node_rank} {nnodes} {master_addr}
{master_port} {host} {addr} are replaced. Output is streamed, each line prefixed
with `[host<i>]`. When a host's command fails, the others get --grace-s seconds
to end by themselves and are then terminated. Exit status: the first failing
host's, 0 when all succeed, 130/143 on Ctrl-C/SIGTERM. The namespaces are removed
on every exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

PREFIX = "snc"
SUBNET = "198.18.0"
PREFIX_LEN = 24
HOST_IFNAME = "eth0"
MAX_HOSTS = 200
RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
RATE_SCALE = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class Interrupted(Exception):
    """SIGINT/SIGTERM/SIGHUP arrived: stop the hosts and clean up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Cluster:
    name: str
    hosts: int
    rate_bit_s: int | None
    """Per-direction limit of every host link; None = unshaped."""
    latency_ms: float
    mtu_bytes: int

    @property
    def switch_ns(self) -> str:
        return f"{self.name}-sw"

    def host_ns(self, i: int) -> str:
        return f"{self.name}-h{i}"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def namespaces(self) -> list[str]:
        return [self.switch_ns] + [self.host_ns(i) for i in range(self.hosts)]


def parse_rate_bit_s(text: str) -> int | None:
    """`200mbit` → 200000000; `unlimited` → None. Bits only: tc's `mbps` would mean megabytes."""
    if text.lower() in ("unlimited", "none", "0"):
        return None
    match = RATE.match(text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"rate {text!r}: give NUMBER with bit|kbit|mbit|gbit (e.g. 200mbit), or unlimited")
    rate = int(float(match[1]) * RATE_SCALE[match[2]])
    if rate < 8000:
        raise argparse.ArgumentTypeError(f"rate {text!r} is below 8kbit")
    return rate


def tbf_args(rate_bit_s: int, latency_ms: float) -> list[str]:
    # The bucket holds 1 ms of traffic (at least 16 KiB, so a few full-size frames
    # pass at once at any rate); GSO super-packets above it are split by tbf itself.
    burst_bytes = max(16 * 1024, rate_bit_s // 8 // 1000)
    return ["tbf", "rate", f"{rate_bit_s}bit", "burst", str(burst_bytes), "latency", f"{latency_ms}ms"]


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def tc(namespace: str, *args: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", namespace, "tc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} in {namespace}: {proc.stderr.strip()}")


def existing_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def create(cluster: Cluster) -> None:
    """Switch namespace with a bridge, one namespace per host, shaped veth links."""
    sw = cluster.switch_ns
    ip("netns", "add", sw)
    ip("-n", sw, "link", "set", "lo", "up")
    ip("-n", sw, "link", "add", "br0", "mtu", str(cluster.mtu_bytes), "type", "bridge")
    ip("-n", sw, "link", "set", "br0", "up")
    for i in range(cluster.hosts):
        ns, port = cluster.host_ns(i), f"p{i}"
        ip("netns", "add", ns)
        ip("link", "add", HOST_IFNAME, "netns", ns, "mtu", str(cluster.mtu_bytes), "type", "veth",
           "peer", "name", port, "netns", sw, "mtu", str(cluster.mtu_bytes))
        ip("-n", sw, "link", "set", port, "master", "br0")
        ip("-n", sw, "link", "set", port, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{cluster.addr(i)}/{PREFIX_LEN}", "dev", HOST_IFNAME)
        ip("-n", ns, "link", "set", HOST_IFNAME, "up")
        if cluster.rate_bit_s is not None:
            shape = tbf_args(cluster.rate_bit_s, cluster.latency_ms)
            tc(ns, "qdisc", "add", "dev", HOST_IFNAME, "root", *shape)  # the host's upload
            tc(sw, "qdisc", "add", "dev", port, "root", *shape)  # the host's download


def kill_namespace_processes(namespace: str) -> None:
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def destroy(names: Sequence[str]) -> list[str]:
    """Remove namespaces (their veths and bridge go with them); returns the ones that could not be removed."""
    left = []
    for namespace in names:
        if namespace not in existing_namespaces():
            continue
        kill_namespace_processes(namespace)
        if subprocess.run(["ip", "netns", "del", namespace], capture_output=True).returncode != 0:
            left.append(namespace)
    return left


def stale_namespaces() -> list[str]:
    """Namespaces of earlier runs of this tool whose process is gone."""
    stale = []
    for namespace in existing_namespaces():
        match = re.match(rf"^{PREFIX}(\d+)-(sw|h\d+)$", namespace)
        if match and not os.path.exists(f"/proc/{match[1]}"):
            stale.append(namespace)
    return stale


def substitute(arg: str, fields: dict[str, str]) -> str:
    """Replace {name} for the known names only, so that other braces (shell, JSON) pass untouched."""
    for name, value in fields.items():
        arg = arg.replace("{" + name + "}", value)
    return arg


def host_command(cluster: Cluster, i: int, command: Sequence[str], torchrun_nproc: int | None,
                 master_port: int) -> list[str]:
    fields = {"node_rank": str(i), "nnodes": str(cluster.hosts), "master_addr": cluster.addr(0),
              "master_port": str(master_port), "host": f"host{i}", "addr": cluster.addr(i)}
    args = [substitute(arg, fields) for arg in command]
    if torchrun_nproc is not None:
        args = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={cluster.hosts}", f"--node_rank={i}",
                f"--nproc_per_node={torchrun_nproc}", f"--master_addr={cluster.addr(0)}",
                f"--master_port={master_port}", *args]
    # Its own UTS namespace gives each host its own hostname, so jobs count K nodes.
    return ["ip", "netns", "exec", cluster.host_ns(i), "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', f"host{i}", *args]


def host_env(cluster: Cluster, i: int, master_port: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    env.update(NODE_RANK=str(i), NNODES=str(cluster.hosts), MASTER_ADDR=cluster.addr(0),
               MASTER_PORT=str(master_port), NETNS_HOST=f"host{i}",
               NETNS_RATE_BIT_S=str(cluster.rate_bit_s or 0), GLOO_SOCKET_IFNAME=HOST_IFNAME,
               NCCL_SOCKET_IFNAME=HOST_IFNAME, PYTHONUNBUFFERED="1")
    return env


def stream(proc: subprocess.Popen[bytes], tag: str, lock: threading.Lock) -> None:
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with lock:
            sys.stdout.write(f"[{tag}] {line}\n")
            sys.stdout.flush()


def stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """SIGTERM each host's process group, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)


def run_hosts(cluster: Cluster, commands: list[list[str]], envs: list[dict[str, str]], grace_s: float) -> int:
    lock = threading.Lock()
    procs: list[subprocess.Popen[bytes]] = []
    readers: list[threading.Thread] = []
    try:
        for i, (command, env) in enumerate(zip(commands, envs)):
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            procs.append(proc)
            reader = threading.Thread(target=stream, args=(proc, f"host{i}", lock), daemon=True)
            reader.start()
            readers.append(reader)
        first_failure: int | None = None
        failed_at: float | None = None
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if first_failure is None and any(c not in (None, 0) for c in codes):
                first_failure = next(c for c in codes if c not in (None, 0))
                failed_at = time.monotonic()
                host = next(i for i, c in enumerate(codes) if c not in (None, 0))
                print(f"[netns] host{host} exited with {first_failure}; the others get {grace_s:g} s", flush=True)
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                print("[netns] terminating the remaining hosts", flush=True)
                stop(procs)
            time.sleep(0.1)
        for reader in readers:
            reader.join(timeout=5)
        if first_failure is None:
            first_failure = next((p.returncode for p in procs if p.returncode != 0), 0)
        return first_failure
    finally:
        stop(procs)


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="netns_cluster.py", description="Run a command on K emulated hosts joined by rate-limited links (root).",
        epilog="Everything after -- is the command run on every host.")
    parser.add_argument("--hosts", type=int, default=2, help="number of hosts K (default 2)")
    parser.add_argument("--rate", type=parse_rate_bit_s, default=None,
                        help="per-direction link rate, e.g. 100mbit, 1gbit, or unlimited (default)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="longest queueing delay tbf allows before dropping (sets its queue length; default 20)")
    parser.add_argument("--mtu", type=int, default=1500,
                        help="MTU of every link in bytes (default 1500; 9000 for jumbo frames)")
    parser.add_argument("--torchrun", action="store_true",
                        help="run `torchrun --nnodes K --node_rank i --master_addr host0 ... COMMAND` on each host")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="with --torchrun: processes per host")
    parser.add_argument("--master-port", type=int, default=29500, help="MASTER_PORT on host 0 (default 29500)")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="after a host fails, how long the others may run on (default 30)")
    parser.add_argument("--cleanup", action="store_true", help="remove namespaces left by killed runs, then exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.cleanup and not args.command:
        parser.error("no command given; put it after --")
    if not 1 <= args.hosts <= MAX_HOSTS:
        parser.error(f"--hosts must be between 1 and {MAX_HOSTS}")
    if not 1280 <= args.mtu <= 65535:
        parser.error("--mtu must be between 1280 and 65535")
    if args.nproc_per_node < 1:
        parser.error("--nproc-per-node must be >= 1")
    return args


def preflight() -> str | None:
    """Why this cannot run here, or None."""
    if os.geteuid() != 0:
        return "must run as root: it creates network namespaces and tc qdiscs (try: sudo python scripts/netns_cluster.py ...)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found; install {package} (apt-get install {package})"
    return None


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    problem = preflight()
    if problem:
        print(f"netns_cluster.py: {problem}", file=sys.stderr)
        return 2
    left = destroy(stale_namespaces())
    if args.cleanup:
        print(f"netns_cluster.py: cleaned up; {'could not remove ' + ', '.join(left) if left else 'nothing left'}")
        return 1 if left else 0
    cluster = Cluster(f"{PREFIX}{os.getpid()}", args.hosts, args.rate, args.latency_ms, args.mtu)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupted)
    try:
        print(f"[netns] pid {os.getpid()} namespaces {' '.join(cluster.namespaces())}", flush=True)
        create(cluster)
        rate = "unlimited" if cluster.rate_bit_s is None else f"{cluster.rate_bit_s / 1e6:g} Mbit/s each way (tc tbf)"
        hosts = ", ".join(f"host{i}={cluster.addr(i)}" for i in range(cluster.hosts))
        print(f"[netns] {cluster.hosts} hosts on one switch: {hosts}; links {rate}, MTU {cluster.mtu_bytes}",
              flush=True)
        nproc = args.nproc_per_node if args.torchrun else None
        commands = [host_command(cluster, i, args.command, nproc, args.master_port) for i in range(cluster.hosts)]
        envs = [host_env(cluster, i, args.master_port) for i in range(cluster.hosts)]
        return run_hosts(cluster, commands, envs, args.grace_s)
    except Interrupted as exc:
        print(f"[netns] {exc}: stopping the hosts and removing the namespaces", file=sys.stderr, flush=True)
        return 128 + exc.signum
    except RuntimeError as exc:
        print(f"netns_cluster.py: {exc}", file=sys.stderr)
        return 1
    finally:
        # Cleanup must finish even if the signal comes again.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        left = destroy(cluster.namespaces())
        if left:
            print(f"netns_cluster.py: could not remove {', '.join(left)}; run --cleanup", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
