"""pytest fixture ``slurm_cluster``: one real two-node Slurm cluster per test session.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.slurm_fixture"]``, or
import the fixture into a test module. Tests that use it are skipped, with the reason,
where Slurm is not installed or the tests do not run as root; a cluster that is
installed but fails to start is an error, with the daemons' log tails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

try:
    from tests.slurm_cluster import SlurmCluster, why_unusable
except ImportError:  # tests/ itself on sys.path (pytest's rootdir-less import)
    from slurm_cluster import SlurmCluster, why_unusable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = why_unusable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm", numbered=True)
    # munged's socket path must fit in a unix socket address (108 bytes).
    cluster = SlurmCluster(root if len(str(root)) < 70 else None)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
