"""The suite's rules, in one place: the real components a test needs, and no process left behind.

Markers (registered in pyproject.toml):

- ``slurm``, ``netns``, ``mpi``: the test needs that real component (a Slurm cluster the tests
  start, network namespaces with tc, an MPI). Where it is missing the test is skipped with the
  reason; under ``CI=true`` it fails instead, since CI installs every one of them and a missing one
  is a broken set-up, not a reason to pass.
- ``gpu``: needs a CUDA device. Skipped with the reason where there is none, CI included (CI's
  machines have no accelerator; ``scripts/gpu_check.sh`` runs these checks on one).
- ``slow``: over about 20 s on two cores; ``-m "not slow"`` leaves them out of a quick loop.

Processes: the test run is made the "child subreaper" of everything it starts (Linux), so a
process whose parent died is adopted by the run instead of by init and stays visible. After each
test, anything the test started that is still there after a short grace is killed and the test
errors; at the end of the run, anything left makes the run fail with the list.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.components import COMPONENTS, require

pytest_plugins = ["tests.slurm_fixture", "tests.shared_runs"]

LEFTOVER_GRACE_S = 15.0  # a job's own teardown (torchrun reaping its ranks, slurmstepd) may take seconds
PR_SET_CHILD_SUBREAPER = 36


# -- real components -----------------------------------------------------------------------------


def pytest_runtest_setup(item: pytest.Item) -> None:
    for component in COMPONENTS:
        if item.get_closest_marker(component) is not None:
            require(component)


# -- no process left -----------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: orphans go to init and only the direct children are checked


def _descendants() -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return {}


def _describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            lines.append(f"  pid {p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"  pid {p.pid}: (gone)")
    return "\n".join(lines)


def _reap(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """Wait up to ``grace_s`` for ``procs`` to end by themselves; kill and return those that did not."""
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return alive


@pytest.fixture(autouse=True)
def no_process_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Everything a test started has ended when it ends (processes of session fixtures, such as the
    Slurm daemons, and what runs below them are theirs, not the test's)."""
    before = _descendants()
    yield
    keys = set()
    for pid, p in before.items():
        try:
            keys.add((pid, p.create_time()))
        except psutil.Error:  # ended during the test
            pass
    new = []
    for pid, p in _descendants().items():
        try:
            if (pid, p.create_time()) in keys or any(a.pid in before for a in p.parents()):
                continue
        except psutil.Error:
            continue
        new.append(p)
    if new:
        left = _reap(new, LEFTOVER_GRACE_S)
        if left:
            pytest.fail(f"{request.node.nodeid} left {len(left)} process(es) running (now killed):\n"
                        f"{_describe(left)}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = list(_descendants().values())
    if not left:
        return
    killed = _reap(left, LEFTOVER_GRACE_S)
    if killed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the test run left {len(killed)} process(es) running (now killed):\n{_describe(killed)}"
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- shared fixtures -----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache folder of the test run's own, for the jobs it starts and for in-process tests.

    The FLOP/s and bandwidth probes cache their results per host under ``$XDG_CACHE_HOME/scaling``:
    a test must neither read a figure a user's job measured nor leave its own behind.
    """
    cache = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def torch_threads_restored() -> Iterator[None]:
    """A test that changes torch's thread count in this process gives it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

