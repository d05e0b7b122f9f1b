"""The test harness: real RabbitMQ and databases, the dispatcher's real processes, the simulator as GPU.

Every name a test run creates (models, tokens) carries the run's id, so runs
never see each other's queues; the model queues are deleted at the end. Each
run also gets its own database on both servers (``dispatch_<run id>``), made
with the ``db-init`` scripts and dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import contract
from sender.token_records import TokenFields, add_token
from tools import stack

RUN_ID = uuid.uuid4().hex[:8]
DEAD_LETTER_QUEUE = f"{contract.DEAD_LETTER_QUEUE}-{RUN_ID}"

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", stack.DEFAULT_RABBITMQ_URL)
SERVER_URLS = {
    "postgres": os.environ.get("TEST_POSTGRES_URL", stack.DEFAULT_POSTGRES_URL),
    "mysql": os.environ.get("TEST_MYSQL_URL", stack.DEFAULT_MYSQL_URL),
}
RUN_DATABASE = f"dispatch_{RUN_ID}"
DATABASE_URLS = {kind: stack.with_database(url, RUN_DATABASE) for kind, url in SERVER_URLS.items()}
"""This run's own databases, migrated with the db-init scripts."""
# Small enough that the whole suite runs in seconds, large enough to be measurable.
FAST_SIMULATOR = {"ttft_ms": 5, "itl_ms": 2, "max_num_seqs": 16, "default_max_tokens": 8}


def pytest_sessionstart(session: pytest.Session) -> None:
    problems = stack.missing_services()
    if problems:
        pytest.exit("services the tests need are down:\n  " + "\n  ".join(problems), returncode=3)
    for url in SERVER_URLS.values():
        stack.create_database(url, RUN_DATABASE)
    for url in DATABASE_URLS.values():
        stack.migrate(url)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for url in SERVER_URLS.values():
        stack.drop_database(url, RUN_DATABASE)


def unique(name: str) -> str:
    return f"{name}-{RUN_ID}"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


class Processes:
    """Starts processes for tests and stops every one of them at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.services: list[stack.Service] = []
        self.models: set[str] = set()

    def simulator(self, model: str, name: str | None = None, **options: object) -> stack.Service:
        settings = {**FAST_SIMULATOR, **options}
        service = stack.start_simulator(
            self.log_dir, model=model, name=name or f"simulator-{model}", **settings
        )
        self.services.append(service)
        return service

    def vllm_cpu(self, names: list[str], max_num_seqs: int | None = None) -> stack.Service:
        """A real vLLM (CPU build, already set up) serving the tiny model under ``names``."""
        service = stack.start_vllm_cpu(self.log_dir, names=names, max_num_seqs=max_num_seqs)
        self.services.append(service)
        return service

    def consumer(
        self,
        model: str,
        backend: stack.Service,
        name: str | None = None,
        rabbitmq_url: str = RABBITMQ_URL,
        **options: object,
    ) -> stack.Service:
        if rabbitmq_url == RABBITMQ_URL:
            self.models.add(model)
        options.setdefault("dead_letter_queue", DEAD_LETTER_QUEUE)
        service = stack.start_consumer(
            self.log_dir,
            model=model,
            vllm_url=backend.url,
            rabbitmq_url=rabbitmq_url,
            name=name or f"consumer-{model}",
            **options,
        )
        self.services.append(service)
        return service

    def one_slot(self, model: str, **consumer_options: object) -> tuple[stack.Service, stack.Service]:
        """A backend that runs one sequence at a time (5 ms a token) behind a consumer that takes one
        request at a time: everything else waits in the broker, where tests can watch it."""
        backend = self.simulator(model, max_num_seqs=1, ttft_ms=5, itl_ms=5)
        consumer = self.consumer(model, backend, flow="fixed", max_inflight=1, **consumer_options)
        return backend, consumer

    def sender(
        self,
        database: str,
        database_url: str | None = None,
        rabbitmq_url: str = RABBITMQ_URL,
        **options: object,
    ) -> stack.Service:
        """A sender on this run's database of kind ``database`` (or at ``database_url``)."""
        options.setdefault("max_body_bytes", 1024 * 1024)
        options.setdefault("queue_stats_seconds", 0.02)
        options.setdefault("token_cache_seconds", 1.0)
        service = stack.start_sender(
            self.log_dir,
            database_url=database_url or DATABASE_URLS[database],
            rabbitmq_url=rabbitmq_url,
            name=f"sender-{database}-{len(self.services)}",
            **options,
        )
        self.services.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()


@pytest.fixture(scope="session")
def processes(log_dir: Path) -> Iterator[Processes]:
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
async def engines() -> AsyncIterator[dict[str, AsyncEngine]]:
    made = {kind: create_async_engine(url) for kind, url in DATABASE_URLS.items()}
    yield made
    for engine in made.values():
        await engine.dispose()


class Tokens:
    def __init__(self, engines: dict[str, AsyncEngine]) -> None:
        self._engines = engines

    async def create(
        self,
        name: str,
        *,
        priority: int = 5,
        threshold: int = 1000,
        max_seconds: float | None = None,
        database: str = "postgres",
    ) -> str:
        fields = TokenFields(priority=priority, threshold=threshold, max_seconds=max_seconds)
        return await add_token(self._engines[database], unique(name), fields=fields)


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


async def wait_listed(
    sender: stack.Service, token: str, model: str, listed: bool = True, timeout: float = 20
) -> None:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as client:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            response = await client.get("/v1/models")
            ids = [entry["id"] for entry in response.json().get("data", [])]
            if (model in ids) == listed:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"model {model} {'never' if listed else 'still'} listed after {timeout} s")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
