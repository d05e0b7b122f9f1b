"""Open WebUI against a local stack: needs RabbitMQ, PostgreSQL and MariaDB, like tests/api."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _services(services: None) -> None:
    """Stops the run, naming the service that is down and how to start it, before any test here."""
