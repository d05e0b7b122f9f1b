"""The sender honours every token field: enabled, expiry, allowed models, priority, threshold,
requests and tokens per minute (held across two sender replicas), on both databases."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import httpx
import orjson
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from harness.api import auth, until_status
from harness.observe import scrape, total
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import Tokens, unique
from harness.tokens import create_token
from sender.token_records import database_now, set_token


async def post(front: Service, secret: str, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": "hi", "max_tokens": 2, **extra}
    async with httpx.AsyncClient(base_url=front.url, headers=auth(secret)) as http:
        return await http.post("/v1/completions", json=body)


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


async def test_disabled_and_expired_tokens_get_401(
    sender: Service, ready_model: str, tokens: Tokens, engines: dict[str, AsyncEngine]
) -> None:
    engine = engines["postgres"]
    name = unique("expiring")
    soon = await database_now(engine) + dt.timedelta(seconds=2)
    secret = await create_token(engine, name, priority=3, expires_at=soon)
    assert (await post(sender, secret, ready_model)).status_code == 200
    await until_status(sender, secret, ready_model, 401)  # expiry applies even to a cached token
    assert error_code(await post(sender, secret, ready_model)) == "token_expired"

    await set_token(engine, name, expires_at=None, enabled=False)
    for _ in range(100):  # within the cache TTL (1 s here)
        response = await post(sender, secret, ready_model)
        if error_code(response) == "token_disabled":
            break
        await asyncio.sleep(0.05)
    assert response.status_code == 401 and error_code(response) == "token_disabled"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_models_outside_the_allowed_list_do_not_exist(
    sender: Service, ready_model: str, tokens: Tokens, engines: dict[str, AsyncEngine]
) -> None:
    secret = await create_token(engines["postgres"], unique("narrow"), priority=5, models=["elsewhere"])
    hidden = await post(sender, secret, ready_model)
    missing = await post(sender, secret, unique("no-such-model"))
    assert hidden.status_code == missing.status_code == 404
    assert error_code(hidden) == error_code(missing) == "model_not_found"
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(secret)) as http:
        listed = (await http.get("/v1/models")).json()["data"]
        card = await http.get(f"/v1/models/{ready_model}")
    assert ready_model not in [m["id"] for m in listed]
    assert card.status_code == 404


async def test_priority_and_threshold_changes_take_effect(
    sender: Service, ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    engine = engines["postgres"]
    name = unique("changing")
    secret = await create_token(engine, name, priority=2, threshold=1000)

    async def logged_priority() -> int:
        request_id = f"prio-{unique('r')}-{time.monotonic_ns()}"
        async with httpx.AsyncClient(base_url=sender.url, headers=auth(secret)) as http:
            response = await http.post(
                "/v1/completions",
                json={"model": ready_model, "prompt": "x", "max_tokens": 1},
                headers={"X-Request-Id": request_id},
            )
        assert response.status_code == 200
        for _ in range(50):
            for line in sender.log_path.read_text().splitlines():
                if request_id in line:
                    priority: int = orjson.loads(line)["priority"]
                    return priority
            await asyncio.sleep(0.05)
        raise AssertionError("no log line")

    assert await logged_priority() == 2
    await set_token(engine, name, priority=8)
    for _ in range(50):
        if await logged_priority() == 8:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the new priority never applied")

    # The lowest threshold there is: a request waiting in the queue (or published by this sender and
    # not yet taken) is one too many, so a burst sees some refused.
    await set_token(engine, name, threshold=1)
    for _ in range(50):
        burst = await asyncio.gather(*(post(sender, secret, ready_model) for _ in range(20)))
        refused = [r for r in burst if r.status_code == 429]
        if refused:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the new threshold never applied")
    assert error_code(refused[0]) == "queue_full" and refused[0].headers["retry-after"]


@pytest_asyncio.fixture(scope="module")
async def replicas(processes: Processes, ready_model: str) -> dict[str, list[Service]]:
    """Two senders on each database, sharing the limits through it; token lookups cached long."""
    made = {}
    for kind in ("postgres", "mysql"):
        made[kind] = [processes.sender(kind, rate_sync_seconds=0.2, token_cache_seconds=60) for _ in range(2)]
    return made


async def same_minute(needed: float = 8.0) -> None:
    """Limits count per calendar minute: start where the next ``needed`` seconds stay in one."""
    left = 60 - time.time() % 60
    if left < needed:
        await asyncio.sleep(left + 0.1)


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
async def test_requests_per_minute_hold_across_two_senders(
    kind: str, replicas: dict[str, list[Service]], ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    first, second = replicas[kind]
    secret = await create_token(engines[kind], unique(f"rpm-{kind}"), priority=5, rpm=4)
    await same_minute()
    answers = [await post((first, second)[i % 2], secret, ready_model) for i in range(10)]
    statuses = [r.status_code for r in answers]
    assert statuses.count(200) == 4 and statuses.count(429) == 6, statuses
    refused = next(r for r in answers if r.status_code == 429)
    assert error_code(refused) == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # Each sender asked the database for this token once (the first token these senders see).
    for front in (first, second):
        _, samples = await scrape(front)
        assert total(samples, "dispatcher_token_queries_total") == 1


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
async def test_tokens_per_minute_hold_across_two_senders(
    kind: str, replicas: dict[str, list[Service]], ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    first, second = replicas[kind]
    secret = await create_token(engines[kind], unique(f"tpm-{kind}"), priority=5, tpm=10)
    await same_minute()
    spent = await post(first, secret, ready_model, max_tokens=12)  # admitted: nothing counted yet
    assert spent.status_code == 200 and spent.json()["usage"]["total_tokens"] > 10
    # Counted once the answer is complete; the other replica sees it within the sync interval.
    await until_status(second, secret, ready_model, 429)
    assert error_code(await post(first, secret, ready_model)) == "rate_limit_exceeded"


async def test_fields_apply_on_mysql_too(
    replicas: dict[str, list[Service]], ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    front = replicas["mysql"][0]
    narrow = await create_token(engines["mysql"], unique("narrow-my"), models=["elsewhere"])
    assert error_code(await post(front, narrow, ready_model)) == "model_not_found"
    past = await database_now(engines["mysql"]) - dt.timedelta(minutes=1)
    expired = await create_token(engines["mysql"], unique("past-my"), expires_at=past)
    assert error_code(await post(front, expired, ready_model)) == "token_expired"
