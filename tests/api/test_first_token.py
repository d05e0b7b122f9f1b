"""The first token of a stream reaches the client at once, whatever the consumer's batching interval.

The backend here is one the test drives: it opens a chat stream with vLLM's
role-only event, sends the first token only once the client has that event,
and holds everything after the first token until the client has seen it. The
consumer batches with an hour between pieces, so a first token that waited
for a batch would never arrive: the test fails on its own timeout instead.
No timing is asserted, only the order of events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest_asyncio
from aiohttp import web

from harness.api import auth, wait_listed
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import unique


def _event(delta: dict[str, object], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class GatedBackend:
    """A chat backend whose stream advances only when the test says so."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.role_seen = asyncio.Event()
        """Set by the test once the client has the role event: then the first token is sent."""
        self.release = asyncio.Event()
        """Set by the test once the client has the first token: then the rest is sent."""
        self.holding_rest = False
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, _: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "max_model_len": 4096}
        return web.json_response({"object": "list", "data": [card]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_event({"role": "assistant", "content": ""}))
        await asyncio.wait_for(self.role_seen.wait(), 30)
        await response.write(_event({"content": "First"}))
        self.holding_rest = True
        await asyncio.wait_for(self.release.wait(), 30)
        self.holding_rest = False
        await response.write(_event({"content": " second"}, finish="stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest_asyncio.fixture
async def gated(processes: Processes, sender: Service, token: str) -> AsyncIterator[GatedBackend]:
    backend = GatedBackend(unique("gated"))
    await backend.start()
    consumer = processes.consumer(backend.model, backend, flush_interval=3600)
    try:
        await wait_listed(sender, token, backend.model)
        yield backend
    finally:
        consumer.stop()
        await backend.close()


async def test_the_first_token_reaches_the_client_while_the_backend_holds_the_second(
    gated: GatedBackend, sender: Service, token: str
) -> None:
    body = {"model": gated.model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    received = b""
    order: list[str] = []
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
        session.post(sender.url + "/v1/chat/completions", json=body, headers=auth(token)) as response,
    ):
        assert response.status == 200
        async for piece in response.content.iter_any():
            received += piece
            if b'"role":"assistant"' in received and not gated.role_seen.is_set():
                order.append("role")
                gated.role_seen.set()
            if b"First" in received and not gated.release.is_set():
                order.append("first token, backend holding the rest" if gated.holding_rest else "first token")
                gated.release.set()
    assert order == ["role", "first token, backend holding the rest"]
    assert received.endswith(b"data: [DONE]\n\n") and b" second" in received
