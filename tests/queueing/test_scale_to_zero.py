"""A model that sleeps (no consumer, maybe never started): its queue exists from the sender's start
(``SENDER_MODELS``), its requests wait and wake it, it is listed as sleeping, and what went stale
while it slept (client gone, deadline passed) never reaches its backend after the wake-up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aio_pika
import aiormq
import httpx
import openai
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

import contract
from harness.api import auth, wait_listed
from harness.observe import queue_depth, request_lines, wait_depth
from harness.processes import Processes
from harness.recording_backend import RecordingBackend
from harness.stack import Service
from harness.testrun import RABBITMQ_URL, unique
from harness.tokens import create_token


async def queue_exists(model: str) -> bool:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(contract.model_queue(model), passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True


NEVER_RAN, ASLEEP, OTHER, RECORDED = (unique(name) for name in ("never-ran", "asleep", "other", "recorded"))
"""The configured models, one per test (the sender is shared: starting one costs seconds)."""


@pytest.fixture(scope="module")
def queue_absent_at_first() -> bool:
    return not asyncio.run(queue_exists(NEVER_RAN))


@pytest.fixture(scope="module")
def sender(processes: Processes, queue_absent_at_first: bool) -> Service:
    models = (NEVER_RAN, ASLEEP, OTHER, RECORDED)
    processes.models.update(models)  # the sender declares their queues: deleted at the end of the run
    return processes.sender("postgres", models=",".join(models))


@pytest.fixture
def recording() -> Iterator[RecordingBackend]:
    backend = RecordingBackend(RECORDED)
    try:
        yield backend
    finally:
        backend.close()


async def test_a_model_that_never_ran_wakes_on_its_first_request(
    processes: Processes, sender: Service, token: str, queue_absent_at_first: bool
) -> None:
    model = NEVER_RAN
    assert queue_absent_at_first
    assert await queue_exists(model)  # declared by the sender, before any consumer

    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
        waiting = asyncio.create_task(
            http.post("/v1/completions", json={"model": model, "prompt": "wake up", "max_tokens": 2})
        )
        async with asyncio.timeout(30):
            while await queue_depth(model) == 0:
                assert not waiting.done(), waiting.result().text
                await asyncio.sleep(0.05)
        assert not waiting.done()  # waits: neither 404 nor 503

        backend = processes.simulator(model)
        processes.consumer(model, backend, name=f"consumer-{model}-woken")
        async with asyncio.timeout(30):
            response = await waiting
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]


async def test_the_list_shows_sleeping_models_to_the_tokens_that_may_use_them(
    processes: Processes, sender: Service, token: str, engines: dict[str, AsyncEngine]
) -> None:
    asleep, other = ASLEEP, OTHER
    client = openai.AsyncOpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0)
    listed = {entry.id: entry for entry in (await client.models.list()).data}
    assert getattr(listed[asleep], "status", None) == "sleeping"
    assert getattr(listed[other], "status", None) == "sleeping"
    card = await client.models.retrieve(asleep)
    assert card.id == asleep and getattr(card, "status", None) == "sleeping"

    narrow = await create_token(engines["postgres"], unique("narrow"), models=[asleep])
    narrow_client = openai.AsyncOpenAI(base_url=sender.url + "/v1", api_key=narrow, max_retries=0)
    assert [entry.id for entry in (await narrow_client.models.list()).data] == [asleep]
    with pytest.raises(openai.NotFoundError):
        await narrow_client.models.retrieve(other)

    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        waiting = asyncio.create_task(
            http.post("/v1/completions", json={"model": asleep, "prompt": "hi", "max_tokens": 2})
        )
        await wait_depth(asleep, 1)

        async def status() -> object:
            (entry,) = [entry for entry in (await client.models.list()).data if entry.id == asleep]
            return getattr(entry, "status", None)

        # A request waits: being woken. The list reads queue depths at most a moment old (a read
        # begun just before the publish may land just after it), so it is asked again a few times.
        seen = [await status()]
        for _ in range(50):
            if seen[-1] == "starting":
                break
            await asyncio.sleep(0.2)
            seen.append(await status())
        assert seen[-1] == "starting", seen
        backend = processes.simulator(asleep)
        processes.consumer(asleep, backend)
        async with asyncio.timeout(30):
            assert (await waiting).status_code == 200
    await wait_listed(sender, token, asleep)
    ready = {entry.id: entry for entry in (await client.models.list()).data}
    assert getattr(ready[asleep], "status", None) == "ready"
    assert getattr(ready[other], "status", None) == "sleeping"


async def test_an_unconfigured_model_without_consumer_is_not_found(sender: Service, token: str) -> None:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        response = await http.post(
            "/v1/completions", json={"model": unique("unconfigured"), "prompt": "hi", "max_tokens": 2}
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert (await http.get(f"/v1/models/{unique('unconfigured')}")).status_code == 404


async def test_stale_requests_never_reach_the_backend_after_the_wake_up(
    processes: Processes, sender: Service, token: str, recording: RecordingBackend
) -> None:
    model = recording.model
    body = {"model": model, "prompt": "too late", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
        # A client that gives up while the model sleeps.
        gone_id = unique("gone")
        gone = asyncio.create_task(http.post("/v1/completions", json=body, headers={"X-Request-Id": gone_id}))
        await wait_depth(model, 1)
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        # A request whose deadline passes while the model sleeps.
        expired = await http.post("/v1/completions", json=body, headers={"X-Request-Timeout": "1"})
        assert expired.status_code == 504, expired.text
        await wait_logged(sender, gone_id, 499)  # its call closed, and so cancelled
    # A request that no consumer took within another sender's cold-start budget: 503, cancelled.
    impatient = processes.sender("postgres", models=model, cold_start_seconds=1)
    async with httpx.AsyncClient(base_url=impatient.url, headers=auth(token), timeout=60) as http:
        refused = await http.post("/v1/completions", json=body)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "model_unavailable"
        assert refused.headers["retry-after"]
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
        processes.consumer(model, recording, name=f"consumer-{model}-woken")
        # Queued after the stale ones at the same priority: once it is answered, they came up too.
        fresh = await http.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )
    assert fresh.status_code == 200, fresh.text
    assert recording.posted() == ["/v1/chat/completions"]


async def wait_logged(sender: Service, request_id: str, status: int, timeout: float = 10) -> None:
    """Until the sender logged the request ``request_id`` with ``status``."""
    async with asyncio.timeout(timeout):
        while True:
            if any(line.get("status") == status for line in request_lines(sender, request_id)):
                return
            await asyncio.sleep(0.05)


async def test_a_configured_queue_lost_by_the_broker_is_declared_again(sender: Service, token: str) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        await (await connection.channel()).queue_delete(contract.model_queue(OTHER))
    assert not await queue_exists(OTHER)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        body = {"model": OTHER, "prompt": "hi", "max_tokens": 2}
        response = await http.post("/v1/completions", json=body, headers={"X-Request-Timeout": "0.5"})
    assert response.status_code == 504, response.text  # queued again, and waited: not 404
    assert await queue_exists(OTHER)
