"""Service-backed tests: each needs RabbitMQ, PostgreSQL and MariaDB and this run's databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.broker_node import BrokerNode


@pytest.fixture(scope="session", autouse=True)
def _services(services: None) -> None:
    """Stops the run, naming the service that is down and how to start it, before any test here."""


@pytest.fixture(scope="module")
def broker_node() -> Iterator[BrokerNode]:
    """A private RabbitMQ node for one test module, which may restart it, alarm it or close its
    connections without touching the machine's broker."""
    node = BrokerNode()
    node.start()
    try:
        yield node
    finally:
        node.stop()
