"""RabbitMQ 4.3 nodes for the tests here: one node and one 3-node cluster, each started once per session.

They are package-scoped: started by the first test here that needs them and
stopped once this folder's tests are done, so the rest of ``make test`` does not
run beside four idle nodes (about 120 MB and a few % of a core each).

They need only the 4.3 install (``harness/rabbitmq43.py``, made once per
machine and cached outside the repository; the first session on a machine
installs it, about a minute and a half). If it cannot be installed or a node
cannot start, every test here fails and says why; none is skipped. The
machine's own broker is never touched. The end-to-end test also needs the
token database, through the ``services`` fixture like every service-backed test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import rabbitmq43


@pytest.fixture(scope="package")
def testbed43() -> Iterator[rabbitmq43.Testbed]:
    try:
        bed = rabbitmq43.Testbed()
    except rabbitmq43.SetupError as exc:
        pytest.fail(f"RabbitMQ {rabbitmq43.SERIES} could not be set up on this machine: {exc}", pytrace=False)
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture(scope="package")
def node43(testbed43: rabbitmq43.Testbed) -> rabbitmq43.Node43:
    """A single 4.3 node."""
    return testbed43.node()


@pytest.fixture(scope="package")
def cluster43(testbed43: rabbitmq43.Testbed) -> list[rabbitmq43.Node43]:
    """Three 4.3 nodes joined into one cluster (``join_cluster``)."""
    return testbed43.cluster(3)
