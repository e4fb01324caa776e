"""scripts/netns_cluster.py for real: namespaces, tc tbf links, multi-node torchrun, cleanup on every exit, and a
resnet job that turns communication-bound as its links slow."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.jobs import NETNS_TOOL, check, end_tree, only_run_dir, read_json, run_command, start

TOOL = NETNS_TOOL
RATE_BIT_S = 200_000_000  # slow enough that 16 MiB messages take a measurable 0.7 s, fast enough to stay short


def tool(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return run_command([sys.executable, TOOL, *args], timeout_s)


def namespaces_of(pid: int) -> list[str]:
    out = run_command(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"snc{pid}-")]


def host_lines(stdout: str, host: int) -> list[str]:
    tag = f"[host{host}] "
    return [line[len(tag):] for line in stdout.splitlines() if line.startswith(tag)]


def test_refuses_when_not_root() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to run as an unprivileged user")
    # In a new user namespace without a uid map, this process is `nobody` (uid 65534).
    proc = run_command(["unshare", "--user", sys.executable, TOOL, "--hosts", "2", "--", "true"])
    if "unshare failed" in proc.stderr:
        pytest.skip(f"user namespaces are not permitted here: {proc.stderr.strip()}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("netns_cluster.py: must run as root: it creates network namespaces and tc qdiscs "
                                   "(try: sudo python scripts/netns_cluster.py ...)")


@pytest.mark.netns
def test_hosts_have_their_own_names_addresses_and_shaped_links_and_nothing_else() -> None:
    probe = ("echo \"$NODE_RANK {nnodes} $(hostname) {addr} $MASTER_ADDR $GLOO_SOCKET_IFNAME\"; "
             "ip -4 -o addr show dev eth0 | wc -l; ip route; tc qdisc show dev eth0; cat /sys/class/net/eth0/mtu")
    proc = tool("--hosts", "3", "--rate", "200mbit", "--mtu", "4000", "--", "sh", "-c", probe)
    stdout = check(proc)
    for host in range(3):
        lines = host_lines(stdout, host)
        assert lines[0] == f"{host} 3 host{host} 198.18.0.{host + 1} 198.18.0.1 eth0"
        assert lines[1] == "1"
        routes = [line for line in lines if " dev " in line and "qdisc" not in line]
        # One route, to the hosts' own /24: no default route, no way out of the namespaces.
        assert [r.strip() for r in routes] == [f"198.18.0.0/24 dev eth0 proto kernel scope link src 198.18.0.{host + 1}"]
        assert any(line.startswith("qdisc tbf") and "rate 200Mbit" in line for line in lines)
        assert lines[-1] == "4000"
    # The tool's own namespaces are gone once it has exited.
    tool_pid = int(next(line for line in stdout.splitlines() if line.startswith("[netns] pid")).split()[2])
    assert namespaces_of(tool_pid) == []


@pytest.mark.netns
def test_a_failing_host_ends_the_job_with_its_exit_status() -> None:
    began = time.monotonic()
    proc = tool("--hosts", "2", "--grace-s", "1", "--", "sh", "-c", 'if [ "$NODE_RANK" = 1 ]; then exit 3; fi; sleep 60')
    assert proc.returncode == 3
    assert time.monotonic() - began < 30  # host0's sleep 60 was cut short
    assert "[netns] host1 exited with 3" in proc.stdout


@pytest.mark.netns
def test_ctrl_c_stops_the_hosts_and_removes_the_namespaces(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = f'echo $$ >> {pids}; exec sleep 120'
    proc = start([sys.executable, TOOL, "--hosts", "2", "--", "sh", "-c", command])
    try:
        deadline = time.monotonic() + 60
        while (not pids.exists() or len(pids.read_text().split()) < 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(namespaces_of(proc.pid)) == 3  # the switch and two hosts exist while it runs
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        end_tree(proc, grace_s=30)
    assert proc.returncode == 130
    assert "SIGINT: stopping the hosts and removing the namespaces" in stderr
    assert namespaces_of(proc.pid) == []
    for pid in pids.read_text().split():
        assert not Path(f"/proc/{pid}").exists(), f"host process {pid} outlived the tool"


@pytest.mark.netns
def test_all_reduce_bus_bandwidth_matches_the_link_rate(tmp_path: Path) -> None:
    # Jumbo frames, as on most cluster Ethernet: with 1500-byte frames TCP/IP headers and ACKs
    # take about 10% of a tbf-shaped link both ways, which is the network's cost, not commbench's.
    proc = tool("--hosts", "2", "--rate", f"{RATE_BIT_S // 10**6}mbit", "--mtu", "9000", "--torchrun", "--",
                "-m", "scaling.commbench", f"paths.root={tmp_path}", "commbench.ops=[all_reduce]",
                "commbench.min_bytes=4194304", "commbench.max_bytes=16777216", "commbench.iters=3",
                "commbench.warmup_iters=1", timeout_s=300)
    check(proc)
    record = read_json(only_run_dir(tmp_path / "commbench") / "commbench.json")
    assert (record["world_size"], record["nodes"], record["backend"]) == (2, 2, "gloo")
    link_GBps = RATE_BIT_S / 8 / 1e9
    largest = max(record["results"], key=lambda r: r["bytes"])
    assert largest["bytes"] == 16 * 2**20
    print(json.dumps({"link_GBps": link_GBps, "busbw_GBps": largest["busbw_GBps"], "fit": record["fit"]}))
    # Every byte crosses a link shaped to 200 Mbit/s each way.
    assert largest["busbw_GBps"] == pytest.approx(link_GBps, rel=0.15)
    (fit,) = record["fit"]
    assert fit["bandwidth_GBps"] == pytest.approx(link_GBps, rel=0.15)


# The same small resnet job on three links: unshaped, 250 Mbit/s and 100 Mbit/s each way.
# 32x32 images, 16 per rank, one thread per process: about 0.5-1 s of compute per step
# (more under CPU contention), against 44.7 MB of resnet18 gradients whose ring all-reduce
# needs 1.4 s at 250 Mbit/s and 3.6 s at 100 Mbit/s.
LINK_RATES = {"unlimited": None, "250mbit": 250_000_000, "100mbit": 100_000_000}
RESNET18_GRAD_BYTES = 11_181_642 * 4  # fp32 parameters of resnet18 with 10 classes
RESNET_JOB = ("-m", "scaling.train", "+exp=resnet", "data.image_size=32", "train.batch_size=16",
              "train.steps=2", "train.warmup_steps=1", "train.log_every=2", "data.num_samples=256",
              "instrument.flops=false", "instrument.ops=false", "instrument.control_steps=0",
              "logger.wandb.mode=disabled")


def ring_all_reduce_s(grad_bytes: float, world_size: int, rate_bit_s: int) -> float:
    """Least time a ring all-reduce of grad_bytes needs when every link carries rate_bit_s each way."""
    return 2 * (world_size - 1) / world_size * grad_bytes * 8 / rate_bit_s


def run_on_links(tmp_path: Path, rates, job: list[str], prefix: str, timeout_s: float) -> list[subprocess.Popen[str]]:
    """The same job on one emulated 2-host cluster per link rate, all at once (study ``<prefix>-<rate>``).

    Each cluster's start-up (imports, rendezvous) is most of its job's time, so running them
    side by side keeps a test near a minute; a cluster still running at the end is stopped,
    which removes its namespaces.
    """
    procs: dict[str, subprocess.Popen[str]] = {}
    logs = {rate: tmp_path / f"{rate}.log" for rate in rates}
    try:
        for rate, log in logs.items():
            with log.open("w") as out:
                procs[rate] = start([sys.executable, TOOL, "--hosts", "2", "--rate", rate, "--mtu", "9000", "--torchrun",
                                     "--", *job, f"paths.root={tmp_path}", f"study.name={prefix}-{rate}"], stdout=out,
                                    merge_stderr=True)
        deadline = time.monotonic() + timeout_s
        for rate, proc in procs.items():
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, f"{rate}: exit {code}\n{logs[rate].read_text()[-4000:]}"
    finally:
        for proc in procs.values():
            end_tree(proc, grace_s=60)  # SIGTERM first: the tool removes its namespaces
    return list(procs.values())


@pytest.mark.netns
def test_resnet_turns_communication_bound_as_the_link_slows(tmp_path: Path) -> None:
    # The three jobs run at the same time, each on its own emulated cluster, which keeps the
    # test within a minute or so: their start-up (imports, rendezvous) is most of each job's
    # time. Sharing the CPUs slows the compute and the unshaped all-reduce of every job; on
    # the shaped links the wire stays the bottleneck.
    for proc in run_on_links(tmp_path, LINK_RATES, RESNET_JOB, "link", timeout_s=300):
        assert namespaces_of(proc.pid) == []

    runs = {rate: read_json(only_run_dir(tmp_path / f"link-{rate}") / "run.json") for rate in LINK_RATES}
    summary = {rate: run["summary"] for rate, run in runs.items()}
    print(json.dumps({rate: {k: s[k] for k in ("step_s", "compute_s", "comm_s", "comm_exposed_s", "comm_wait_s",
                                               "busbw_GBps", "compute_frac", "comm_exposed_frac", "bound")}
                      for rate, s in summary.items()}, indent=1))
    for rate, run in runs.items():
        assert run["status"] == "completed"
        assert (run["world_size"], run["nodes"], run["backend"], run["launcher"]) == (2, 2, "gloo", "torchrun"), rate
        assert summary[rate]["comm_bytes"] == RESNET18_GRAD_BYTES

    # Unshaped, the gradient all-reduce mostly hides behind backward: compute is the largest share.
    assert summary["unlimited"]["bound"] == "compute"
    # At 100 Mbit/s the same job waits on the wire for most of each step.
    assert summary["100mbit"]["bound"] == "communication"

    # Exposed communication grows as the link slows ...
    exposed = {rate: s["comm_exposed_s"] for rate, s in summary.items()}
    assert exposed["unlimited"] < exposed["250mbit"] < exposed["100mbit"], exposed
    # ... and on the slow link by at least half of the extra time the gradient bytes need on
    # the wire (the rest may hide behind backward). Between the unshaped and the 250 Mbit/s
    # link only the order is asserted: there much of the 1.4 s can hide behind backward, and
    # the unshaped all-reduce, which costs CPU time, grows when the CPUs are busy.
    ring_s = {rate: ring_all_reduce_s(RESNET18_GRAD_BYTES, 2, bit_s) for rate, bit_s in LINK_RATES.items() if bit_s}
    assert exposed["100mbit"] - exposed["unlimited"] >= 0.5 * ring_s["100mbit"], (exposed, ring_s)
    assert exposed["100mbit"] - exposed["250mbit"] >= 0.5 * (ring_s["100mbit"] - ring_s["250mbit"]), (exposed, ring_s)
    # That the slower link adds exposed transfer and not interference (the step beyond its no-comm
    # control and its exposed time) is a measurement, not a test: with the three jobs side by side
    # the control steps of one run while the others hold the CPUs or not (the 100 Mbit/s job once
    # read a control step of 0.34 s against 0.86 s of compute). `scripts/experiments.py links`
    # measures it one job at a time.

    # The bus bandwidth the training job measured matches the link: never above it (5% for
    # timing noise; more would mean communication time went uncounted), and close to it on
    # the slow link, where the wire is the bottleneck.
    for rate, bit_s in LINK_RATES.items():
        if bit_s is not None:
            assert summary[rate]["busbw_GBps"] <= 1.05 * bit_s / 8 / 1e9, rate
    slow_link_GBps = LINK_RATES["100mbit"] / 8 / 1e9
    assert 0.7 * slow_link_GBps <= summary["100mbit"]["busbw_GBps"], summary["100mbit"]


# dist.strategy=fsdp on two emulated hosts: four 512x512 layers and a 512->5 head, whose three kinds of
# collective (all-gather in forward, again in backward, reduce-scatter) each move the padded parameters.
FSDP_WIDTH = 512
FSDP_BYTES = (4 * (FSDP_WIDTH * FSDP_WIDTH + FSDP_WIDTH) + 6 * FSDP_WIDTH + 6) * 4  # head padded from 5 to 6 rows
FSDP_JOB = ("-m", "scaling.train", "+exp=mlp", f"model.in_features={FSDP_WIDTH}", f"model.hidden={FSDP_WIDTH}",
            "model.layers=4", "data.num_classes=5", "train.batch_size=4", "data.num_samples=256", "optim=adamw",
            "train.steps=4", "train.warmup_steps=1", "train.log_every=2", "instrument.flops=false",
            "instrument.ops=false", "instrument.control_steps=0", "logger.wandb.mode=disabled", "dist.strategy=fsdp")
FSDP_KINDS = ("allgather_fwd", "allgather_bwd", "reducescatter")


@pytest.mark.netns
def test_fsdp_collectives_wait_on_a_slower_link(tmp_path: Path) -> None:
    rates = {"unlimited": None, "100mbit": 100_000_000}
    run_on_links(tmp_path, rates, FSDP_JOB, "fsdp", timeout_s=240)
    summary = {rate: read_json(only_run_dir(tmp_path / f"fsdp-{rate}") / "run.json")["summary"] for rate in rates}
    print(json.dumps({rate: {k: s[k] for k in ("step_s", "comm_s", "comm_exposed_s", "busbw_GBps", "bound",
                                                *(f"comm_{kind}_exposed_s" for kind in FSDP_KINDS))}
                      for rate, s in summary.items()}, indent=1))
    # Each rank sends (n-1)/n of every collective's bytes over its link: 1.1 MB per kind per step at 100 Mbit/s.
    wire_s = FSDP_BYTES / 2 * 8 / rates["100mbit"]
    for kind in FSDP_KINDS:
        assert summary["100mbit"][f"comm_{kind}_bytes"] == FSDP_BYTES
        grown = summary["100mbit"][f"comm_{kind}_exposed_s"] - summary["unlimited"][f"comm_{kind}_exposed_s"]
        # On CPU nothing hides FSDP's collectives: at least half the extra wire time is exposed, in its own kind.
        assert grown >= 0.5 * wire_s, (kind, grown, wire_s)
    assert summary["100mbit"]["bound"] == "communication"
    # Never more bandwidth than the link (5% for timing noise): no communication time went uncounted.
    assert summary["100mbit"]["busbw_GBps"] <= 1.05 * rates["100mbit"] / 8 / 1e9
