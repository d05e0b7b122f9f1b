"""The fixtures of the service-backed tests: real RabbitMQ and databases, the dispatcher's real processes,
the simulator as GPU.

Nothing here runs for a test that asks for none of it: the unit and deployment
tests need no service. A service-backed folder's own ``conftest.py`` asks for
``services`` for each of its tests, which checks that RabbitMQ, PostgreSQL and
MariaDB answer (the run stops, naming the service that is down and how to
start it; no test is skipped) and makes this run's databases, dropped at the
end. The model queues a run declared are deleted at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import contract
from harness import stack
from harness.api import wait_listed
from harness.processes import Processes
from harness.testrun import (
    DATABASE_URLS,
    DEAD_LETTER_QUEUE,
    RABBITMQ_URL,
    Tokens,
    drop_databases,
    services_down,
    set_up_databases,
    unique,
)


@pytest.fixture(scope="session")
def rabbitmq() -> None:
    """The test broker answers (for tests that need it alone), or the run stops saying how to start it."""
    problem = services_down(["RabbitMQ"])
    if problem:
        pytest.exit(problem, returncode=3)


@pytest.fixture(scope="session")
def services() -> Iterator[None]:
    """Every service answers (or the run stops saying which is down), and this run's databases exist."""
    problem = services_down()
    if problem:
        pytest.exit(problem, returncode=3)
    set_up_databases()
    try:
        yield
    finally:
        drop_databases()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def processes(services: None, log_dir: Path) -> Iterator[Processes]:
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop_all()
        asyncio.run(_delete_queues(procs.models))


async def _delete_queues(models: set[str]) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        for model in models:
            await channel.queue_delete(contract.model_queue(model))
        await channel.queue_delete(DEAD_LETTER_QUEUE)


@pytest_asyncio.fixture(scope="session")
async def engines(services: None) -> AsyncIterator[dict[str, AsyncEngine]]:
    made = {kind: create_async_engine(url) for kind, url in DATABASE_URLS.items()}
    yield made
    for engine in made.values():
        await engine.dispose()


@pytest.fixture(scope="session")
def tokens(engines: dict[str, AsyncEngine]) -> Tokens:
    return Tokens(engines)


@pytest.fixture(scope="session")
def model() -> str:
    return unique("demo")


@pytest.fixture(scope="session")
def simulator(processes: Processes, model: str) -> stack.Service:
    return processes.simulator(model)


@pytest.fixture(scope="session")
def consumer(processes: Processes, model: str, simulator: stack.Service) -> stack.Service:
    return processes.consumer(model, simulator)


@pytest.fixture(scope="session")
def sender(processes: Processes) -> stack.Service:
    return processes.sender("postgres")


@pytest_asyncio.fixture(scope="session")
async def token(tokens: Tokens) -> str:
    return await tokens.create("main", priority=5, threshold=1000)


@pytest_asyncio.fixture(scope="session")
async def ready_model(sender: stack.Service, consumer: stack.Service, model: str, token: str) -> str:
    """The demo model, once the sender lists it (its consumer is up and announced)."""
    await wait_listed(sender, token, model)
    return model
