"""pytest fixture ``slurm_cluster``: one real two-node Slurm cluster per test session.

Loaded by ``tests/conftest.py``. Where Slurm is not installed or the tests do not run as
root, tests that use it skip with the reason, or fail under ``CI=true``
(``tests/components.py``); a cluster that is installed but fails to start is an error,
with the daemons' log tails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.components import require
from tests.slurm_cluster import SlurmCluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    require("slurm")
    root = tmp_path_factory.mktemp("slurm", numbered=True)
    # munged's socket path must fit in a unix socket address (108 bytes).
    cluster = SlurmCluster(root if len(str(root)) < 70 else None)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
