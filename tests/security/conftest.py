"""Service-backed tests: each needs RabbitMQ, PostgreSQL and MariaDB and this run's databases."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _services(services: None) -> None:
    """Stops the run, naming the service that is down and how to start it, before any test here."""
