"""One test run's names and places: its id, the broker and database servers, its own databases.

Every name a test run creates (models, tokens) carries the run's id, so runs
never see each other's queues. Each run that needs the services gets its own
database on both servers (``dispatch_<run id>``), made with the ``db-init``
scripts by ``set_up_databases`` and dropped by ``drop_databases``.
"""

from __future__ import annotations

import os
import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

import contract
from harness import stack
from harness.services import missing_services
from harness.tokens import create_token

RUN_ID = uuid.uuid4().hex[:8]
DEAD_LETTER_QUEUE = f"{contract.DEAD_LETTER_QUEUE}-{RUN_ID}"

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", contract.DEFAULT_RABBITMQ_URL)
SERVER_URLS = {
    "postgres": os.environ.get("TEST_POSTGRES_URL", stack.DEFAULT_POSTGRES_URL),
    "mysql": os.environ.get("TEST_MYSQL_URL", stack.DEFAULT_MYSQL_URL),
}
RUN_DATABASE = f"dispatch_{RUN_ID}"
DATABASE_URLS = {kind: stack.with_database(url, RUN_DATABASE) for kind, url in SERVER_URLS.items()}
"""This run's own databases, migrated with the db-init scripts."""
# Small enough that the whole suite runs in seconds, large enough to be measurable.
FAST_SIMULATOR = {"ttft_ms": 5, "itl_ms": 2, "max_num_seqs": 16, "default_max_tokens": 8}


def unique(name: str) -> str:
    return f"{name}-{RUN_ID}"


def services_down(names: list[str] | None = None) -> str | None:
    """Why the tests cannot run (each service down and how to start it), or None when all answer."""
    problems = missing_services(names)
    if problems:
        return "services the tests need are down:\n  " + "\n  ".join(problems)
    return None


def set_up_databases() -> None:
    """This run's database on both servers, migrated with the db-init scripts."""
    for url in SERVER_URLS.values():
        stack.create_database(url, RUN_DATABASE)
    for url in DATABASE_URLS.values():
        stack.migrate(url)


def drop_databases() -> None:
    for url in SERVER_URLS.values():
        stack.drop_database(url, RUN_DATABASE)


class Tokens:
    """Tokens of this test run (named with its id) in its own databases."""

    def __init__(self, engines: dict[str, AsyncEngine]) -> None:
        self._engines = engines

    async def create(
        self,
        name: str,
        *,
        priority: int = 5,
        threshold: int = 1000,
        max_seconds: float | None = None,
        max_parallel: int | None = None,
        database: str = "postgres",
    ) -> str:
        return await create_token(
            self._engines[database],
            unique(name),
            priority=priority,
            threshold=threshold,
            max_seconds=max_seconds,
            max_parallel=max_parallel,
        )
