"""Every generated token is charged: a stream cancelled by its client or cut by its deadline leaves a
usage row with the tokens generated up to the cut, counted in the minute's tokens-per-minute total,
on both databases; tokens per minute are reserved at admission, so a burst cannot start more than
the limit allows, and a settled answer frees what it reserved beyond its real use."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from harness.api import auth, wait_listed
from harness.observe import usage_rows
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import unique
from harness.tokens import create_token
from sender.limits import WINDOW_SECONDS
from sender.tables import rate_windows_table, tokens_table

SLOW_TOKENS = 400
"""A stream this long lasts 20 s at 50 ms per token: it is cut long before it ends."""


@pytest_asyncio.fixture(scope="module")
async def slow(processes: Processes, engines: dict[str, AsyncEngine]) -> dict[str, object]:
    """A model generating a token every 50 ms, and one sender on each database."""
    model = unique("slow")
    backend = processes.simulator(model, ttft_ms=5, itl_ms=50, max_model_len=4096)
    processes.consumer(model, backend)
    fronts = {kind: processes.sender(kind, rate_sync_seconds=0.2) for kind in ("postgres", "mysql")}
    for kind, front in fronts.items():
        await wait_listed(front, await create_token(engines[kind], unique(f"lister-{kind}")), model)
    return {"model": model, **fronts}


async def same_minute(needed: float = 8.0) -> None:
    """Start where the next ``needed`` seconds stay in one calendar minute (limits count per minute)."""
    left = WINDOW_SECONDS - time.time() % WINDOW_SECONDS
    if left < needed:
        await asyncio.sleep(left + 0.1)


async def counted(engine: AsyncEngine, name: str) -> int:
    """The token's tokens-per-minute totals, over every minute (a fresh token: this test's)."""
    statement = (
        sa.select(sa.func.sum(rate_windows_table.c.tokens))
        .join(tokens_table, tokens_table.c.id == rate_windows_table.c.token_id)
        .where(tokens_table.c.name == name)
    )
    async with engine.connect() as conn:
        return int((await conn.execute(statement)).scalar() or 0)


async def until_counted(engine: AsyncEngine, name: str, expected: int) -> None:
    """The minutes' totals reach ``expected`` once the sender pushed its settlement (every 0.2 s)."""
    for _ in range(100):
        if await counted(engine, name) == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"tokens counted: {await counted(engine, name)}, expected {expected}")


def token_events(body: bytes) -> int:
    return sum(1 for line in body.split(b"\n\n") if line.startswith(b'data: {"') and b'"text":"' in line)


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
async def test_a_cancelled_stream_is_charged_what_it_generated(
    kind: str, slow: dict[str, object], engines: dict[str, AsyncEngine]
) -> None:
    front, model, engine = slow[kind], slow["model"], engines[kind]
    assert isinstance(front, Service) and isinstance(model, str)
    name = unique(f"cancelled-{kind}")
    # A lease (2% of the limit) smaller than the reservation: the minute's total is exact once settled.
    secret = await create_token(engine, name, priority=5, tpm=10_000)
    body = {"model": model, "prompt": "count", "max_tokens": SLOW_TOKENS, "stream": True}
    received = b""
    async with (
        httpx.AsyncClient(base_url=front.url, headers=auth(secret), timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for piece in response.aiter_bytes():
            received += piece
            if token_events(received) >= 5:
                break  # the client goes away mid-stream
    seen = token_events(received)

    (row,) = await usage_rows(engine, name, 1)
    generated = int(row["completion_tokens"])  # type: ignore[call-overload]
    # Charged at least what the client saw, and what the backend produced until the cancel reached
    # it, not the whole answer it was asked for.
    assert seen <= generated < SLOW_TOKENS, (seen, generated)
    assert row["status"] == 200 and row["streamed"] is True
    assert int(row["prompt_tokens"]) > 0  # type: ignore[call-overload]  # asked of the backend after the cut
    charged = generated + int(row["prompt_tokens"])  # type: ignore[call-overload]
    await until_counted(engine, name, charged)  # the reservation replaced by the real count
    request_id = response.headers["x-request-id"]
    assert row["request_id"] == request_id


async def test_a_stream_cut_by_its_deadline_is_charged(
    slow: dict[str, object], engines: dict[str, AsyncEngine]
) -> None:
    front, model, engine = slow["postgres"], slow["model"], engines["postgres"]
    assert isinstance(front, Service) and isinstance(model, str)
    name = unique("deadline")
    secret = await create_token(engine, name, priority=5)
    body = {"model": model, "prompt": "count", "max_tokens": SLOW_TOKENS, "stream": True}
    async with httpx.AsyncClient(base_url=front.url, headers=auth(secret), timeout=30) as http:
        response = await http.post("/v1/completions", json=body, headers={"X-Request-Timeout": "1.5"})
    assert response.status_code == 200
    events = [orjson.loads(e[6:]) for e in response.content.split(b"\n\n") if e.startswith(b"data: {")]
    assert events[-1]["error"]["code"] == "deadline_exceeded"
    plain = {**body, "stream": False}
    async with httpx.AsyncClient(base_url=front.url, headers=auth(secret), timeout=30) as http:
        expired = await http.post("/v1/completions", json=plain, headers={"X-Request-Timeout": "1"})
    assert expired.status_code == 504
    streamed, whole = await usage_rows(engine, name, 2)
    assert token_events(response.content) <= int(streamed["completion_tokens"]) < SLOW_TOKENS  # type: ignore[call-overload]
    # Both processed their prompt; what the plain one generated before the cut is not knowable.
    assert int(streamed["prompt_tokens"]) == int(whole["prompt_tokens"]) > 0  # type: ignore[call-overload]
    assert whole["status"] == 504 and whole["completion_tokens"] == 0


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
async def test_a_burst_cannot_start_more_than_its_tokens_per_minute_allow(
    kind: str, slow: dict[str, object], engines: dict[str, AsyncEngine]
) -> None:
    front, model, engine = slow[kind], slow["model"], engines[kind]
    assert isinstance(front, Service) and isinstance(model, str)
    name = unique(f"burst-{kind}")
    limit = 300
    secret = await create_token(engine, name, priority=5, tpm=limit)
    await same_minute()
    body = {"model": model, "prompt": "hi", "max_tokens": 20}
    size = len(orjson.dumps(body))
    estimate = size // 4 + 20

    async with httpx.AsyncClient(base_url=front.url, headers=auth(secret), timeout=30) as http:
        answers = await asyncio.gather(
            *(http.post("/v1/completions", content=orjson.dumps(body)) for _ in range(40))
        )
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(served) + len(refused) == len(answers)
    # Reservations start at most limit // estimate at once; an answer that ended gave back what it
    # over-reserved, which may start a few more: never more than the limit's worth of real tokens.
    assert len(served) >= limit // estimate and refused
    used = sum(r.json()["usage"]["total_tokens"] for r in served)
    assert used <= limit
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limit_exceeded"}
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)
    await until_counted(engine, name, used)


async def test_a_settled_answer_frees_what_it_reserved(
    slow: dict[str, object], engines: dict[str, AsyncEngine]
) -> None:
    front, model, engine = slow["postgres"], slow["model"], engines["postgres"]
    assert isinstance(front, Service) and isinstance(model, str)
    name = unique("settled")
    limit = 200
    secret = await create_token(engine, name, priority=5, tpm=limit)
    await same_minute()
    long = {"model": model, "prompt": "count", "max_tokens": 180, "stream": True}  # reserves all 200
    short = {"model": model, "prompt": "hi", "max_tokens": 5}
    async with httpx.AsyncClient(base_url=front.url, headers=auth(secret), timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json=long) as running:
            assert running.status_code == 200
            async for _ in running.aiter_bytes():
                break  # under way
            refused = await http.post("/v1/completions", json=short)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        # Cancelled: its reservation is replaced by the few tokens it generated, the rest is free again.
        for _ in range(100):
            admitted = await http.post("/v1/completions", json=short)
            if admitted.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert admitted.status_code == 200
    rows = await usage_rows(engine, name, 2)  # a refused request leaves no row
    charged = sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in rows if r["status"] == 200)  # type: ignore[call-overload]
    await until_counted(engine, name, charged)


@pytest.mark.parametrize("stop", ["backend killed", "consumer stopped"])
async def test_an_interrupted_stream_is_charged_what_it_generated(
    stop: str, processes: Processes, slow: dict[str, object], engines: dict[str, AsyncEngine]
) -> None:
    """The backend dies mid-stream, or the consumer stops and its grace period runs out: the answer
    ends with an error event, and its row holds the tokens generated up to then."""
    front, engine = slow["postgres"], engines["postgres"]
    assert isinstance(front, Service)
    model = unique("killed" if stop == "backend killed" else "stopped")
    backend = processes.simulator(model, ttft_ms=5, itl_ms=50)
    consumer = processes.consumer(model, backend, shutdown_grace=0.5)
    name = unique(f"{model}-token")
    secret = await create_token(engine, name, priority=5)
    await wait_listed(front, secret, model)
    body = {"model": model, "prompt": "count", "max_tokens": SLOW_TOKENS, "stream": True}
    async with (
        httpx.AsyncClient(base_url=front.url, headers=auth(secret), timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        received = b""
        stopped = False
        async for piece in response.aiter_bytes():
            received += piece
            # At least 5: pieces are batched, so the count may step over any given number.
            if not stopped and (token_events(received) >= 5 or b'"error"' in received):
                stopped = True
                if stop == "backend killed":
                    backend.kill()
                else:
                    consumer.process.terminate()
    last = orjson.loads(received.rstrip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "stream_interrupted"
    (row,) = await usage_rows(engine, name, 1)
    assert token_events(received) <= int(row["completion_tokens"]) < SLOW_TOKENS  # type: ignore[call-overload]
    if stop == "consumer stopped":  # the backend is still there to count the prompt
        assert int(row["prompt_tokens"]) > 0  # type: ignore[call-overload]
        await asyncio.to_thread(consumer.process.wait, 15)
