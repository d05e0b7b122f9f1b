"""Usage accounting: one row per request with the backend's token counts, written in batches,
kept through a clean shutdown; streams carry the usage chunk only when the client asked."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from sender.tables import usage_table
from sender.token_records import TokenFields, add_token
from tests.conftest import Processes, auth, unique
from tools.stack import Service


async def usage_rows(engine: AsyncEngine, name: str, count: int) -> list[dict[str, object]]:
    """The token's usage rows, once ``count`` of them are written (batches go out every second)."""
    statement = sa.select(usage_table).where(usage_table.c.token_name == name).order_by(usage_table.c.id)
    for _ in range(150):
        async with engine.connect() as conn:
            rows = [dict(row) for row in (await conn.execute(statement)).mappings()]
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(rows)} usage rows for {name}, expected {count}")


def events(stream: bytes) -> list[dict[str, object]]:
    parsed = []
    for event in stream.split(b"\n\n"):
        if event.startswith(b"data: {"):
            parsed.append(orjson.loads(event[6:]))
    assert stream.rstrip().endswith(b"data: [DONE]")
    return parsed


def shape(event: dict[str, object]) -> tuple[object, ...]:
    """Keys of an event and of its choices: what must match vLLM, whatever the values."""
    choices = event.get("choices") or []
    assert isinstance(choices, list)
    return tuple(sorted(event)), tuple(tuple(sorted(c)) for c in choices), event.get("usage")


async def test_usage_rows_and_streams_with_and_without_usage(
    sender: Service, simulator: Service, ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    engine = engines["postgres"]
    name = unique("metered-token")
    secret = await add_token(engine, name, fields=TokenFields(priority=6))
    chat = {"model": ready_model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    completion = {"model": ready_model, "prompt": "hello there", "max_tokens": 3}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(secret)) as http:
        plain = (await http.post("/v1/completions", json=completion, headers={"X-Priority": "1"})).json()
        streamed_completion = (
            await http.post("/v1/completions", json={**completion, "stream": True})
        ).content
        streamed_chat = (await http.post("/v1/chat/completions", json={**chat, "stream": True})).content
        asked = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        streamed_chat_usage = (await http.post("/v1/chat/completions", json=asked)).content
        too_long = await http.post("/v1/completions", json={**completion, "max_tokens": 10**6})
    assert too_long.status_code == 400
    async with httpx.AsyncClient(base_url=simulator.url) as direct:
        direct_completion = (
            await direct.post("/v1/completions", json={**completion, "stream": True})
        ).content
        direct_chat = (await direct.post("/v1/chat/completions", json={**chat, "stream": True})).content

    # Without include_usage the client gets the stream vLLM sends without it: no usage chunk.
    assert [shape(e) for e in events(streamed_completion)] == [shape(e) for e in events(direct_completion)]
    assert [shape(e) for e in events(streamed_chat)] == [shape(e) for e in events(direct_chat)]
    assert all(e["choices"] for e in events(streamed_chat) + events(streamed_completion))
    *_, usage_chunk = events(streamed_chat_usage)  # asked for: relayed
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3  # type: ignore[index]

    rows = await usage_rows(engine, name, 5)
    by_kind = {(row["path"], row["streamed"], row["status"]): row for row in rows}
    assert len(by_kind) == 4 and len(rows) == 5
    first = rows[0]
    assert first["status"] == 200 and first["streamed"] is False and first["priority"] == 1
    assert first["prompt_tokens"] == plain["usage"]["prompt_tokens"] and first["completion_tokens"] == 3
    assert first["token_id"] and first["model"] == ready_model and first["path"] == "/v1/completions"
    for row in rows[1:4]:  # the streams: counted whether or not the client asked for usage
        assert row["streamed"] is True and row["status"] == 200 and row["priority"] == 6
        assert row["completion_tokens"] == 3 and int(row["prompt_tokens"]) > 0  # type: ignore[call-overload]
    assert rows[1]["prompt_tokens"] == first["prompt_tokens"]
    assert rows[4]["status"] == 400 and rows[4]["completion_tokens"] == 0
    for row in rows:
        assert row["queue_ms"] is not None and int(row["queue_ms"]) >= 0  # type: ignore[call-overload]
        assert int(row["total_ms"]) >= 0 and row["request_id"]  # type: ignore[call-overload]
    assert secret not in sender.log_path.read_text()


async def test_buffered_usage_rows_are_written_on_clean_shutdown(
    processes: Processes, ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    engine = engines["mysql"]
    name = unique("shutdown-token")
    secret = await add_token(engine, name, fields=TokenFields(priority=4))
    front = processes.sender("mysql", usage_flush_seconds=3600)  # nothing written but at the end
    async with httpx.AsyncClient(base_url=front.url, headers=auth(secret)) as http:
        for _ in range(3):
            body = {"model": ready_model, "prompt": "x", "max_tokens": 2, "stream": True}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
    async with engine.connect() as conn:
        written = (
            await conn.execute(sa.select(sa.func.count()).where(usage_table.c.token_name == name))
        ).scalar()
    assert written == 0
    await asyncio.to_thread(front.stop)
    rows = await usage_rows(engine, name, 3)
    assert len(rows) == 3 and all(row["completion_tokens"] == 2 and row["streamed"] for row in rows)
    assert secret not in front.log_path.read_text()
