"""The consumer's side of vLLM's API key, and vLLM's metrics relayed on the status port.

A stand-in backend (aiohttp, in-process) that, like ``vllm serve --api-key``, refuses ``/v1/*``
without the key and records the Authorization header of every call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from pydantic import ValidationError

from consumer.backend import Backend, Health
from consumer.metrics import ConsumerMetrics
from consumer.settings import ConsumerSettings
from consumer.status_server import serve_status
from harness.stack import free_port

KEY = "k-0123456789abcdef"
METRICS = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0.0\n"


class FakeVllm:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.metrics = METRICS

    def app(self) -> web.Application:
        @web.middleware
        async def auth(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            header = request.headers.get("Authorization")
            self.seen.append((request.path, header))
            if request.path.startswith("/v1") and header != f"Bearer {KEY}":
                return web.json_response({"error": "Unauthorized"}, status=401)
            return await handler(request)

        async def health(_: web.Request) -> web.Response:
            return web.Response()

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "m", "object": "model", "max_model_len": 64}]})

        async def chat(_: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=self.metrics, content_type="text/plain")

        app = web.Application(middlewares=[auth])
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/metrics", metrics)
        return app


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[tuple[FakeVllm, str]]:
    backend = FakeVllm()
    runner = web.AppRunner(backend.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield backend, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_the_key_goes_on_every_backend_call(fake: tuple[FakeVllm, str]) -> None:
    server, url = fake
    backend = Backend(url, max_connections=4, api_key=KEY)
    try:
        assert await backend.health(5) is Health.UP
        assert (await backend.models())[0]["max_model_len"] == 64
        async with backend.post("/v1/chat/completions", b"{}") as response:
            assert response.status == 200
        assert await backend.load() is not None
    finally:
        await backend.close()
    assert {path for path, _ in server.seen} == {"/health", "/v1/models", "/v1/chat/completions", "/metrics"}
    assert all(header == f"Bearer {KEY}" for _, header in server.seen)


async def test_without_the_key_vllm_refuses(fake: tuple[FakeVllm, str]) -> None:
    server, url = fake
    backend = Backend(url, max_connections=4)
    try:
        async with backend.post("/v1/chat/completions", b"{}") as response:
            assert response.status == 401
    finally:
        await backend.close()
    assert server.seen == [("/v1/chat/completions", None)]


def test_key_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL", "m")
    assert ConsumerSettings().backend_api_key() is None
    monkeypatch.setenv("CONSUMER_VLLM_API_KEY", KEY)
    settings = ConsumerSettings()
    assert settings.backend_api_key() == KEY
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")  # as `kubectl create secret --from-file` often leaves it
    monkeypatch.setenv("CONSUMER_VLLM_API_KEY_FILE", str(key_file))
    with pytest.raises(ValidationError, match="not both"):
        ConsumerSettings()
    monkeypatch.delenv("CONSUMER_VLLM_API_KEY")
    assert ConsumerSettings().backend_api_key() == KEY
    key_file.write_text("")
    with pytest.raises(ValueError, match="empty"):
        ConsumerSettings().backend_api_key()


async def test_backend_metrics_are_relayed_bounded(fake: tuple[FakeVllm, str]) -> None:
    server, url = fake
    backend = Backend(url, max_connections=4, api_key=KEY)
    stopped = Backend("http://127.0.0.1:1", max_connections=1)  # nothing listens there
    current = {"backend": backend}
    port = free_port()
    status = await serve_status(
        ConsumerMetrics("m"),
        lambda: True,
        "127.0.0.1",
        port,
        backend_metrics=lambda: current["backend"].metrics_exposition(max_bytes=1024, timeout=2),
    )
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/backend-metrics") as response:
                assert response.status == 200
                assert await response.text() == METRICS
                assert response.headers["Content-Type"].startswith("text/plain")
            async with http.get("/metrics") as response:
                assert response.status == 200  # the consumer's own, unchanged
            server.metrics = "x" * 2000
            async with http.get("/backend-metrics") as response:
                assert response.status == 502
                assert "MetricsTooLarge" in await response.text()
            current["backend"] = stopped
            async with http.get("/backend-metrics") as response:
                assert response.status == 502
    finally:
        await status.cleanup()
        await backend.close()
        await stopped.close()
