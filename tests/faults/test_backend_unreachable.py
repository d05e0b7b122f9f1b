"""A backend that looks healthy but drops every request: requeued once, then answered 502, never lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest_asyncio

from harness import stack
from harness.api import auth, wait_listed
from harness.observe import scrape, total
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import DEAD_LETTER_QUEUE, RABBITMQ_URL, unique


class DroppingBackend:
    """Answers ``/health`` and ``/v1/models`` like vLLM, and closes the connection on every POST:
    to the consumer, exactly a server that went away between its health check and the request."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.posts = 0
        self.port = stack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                if method == b"POST":
                    await reader.readexactly(length)
                    self.posts += 1
                    break  # closed without an answer
                if path == b"/health":
                    body, status = b"", b"200 OK"
                elif path == b"/v1/models":
                    body, status = orjson.dumps({"data": [{"id": self.model, "object": "model"}]}), b"200 OK"
                else:
                    body, status = b"", b"404 Not Found"
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest_asyncio.fixture
async def dropping_backend() -> AsyncIterator[DroppingBackend]:
    backend = DroppingBackend(unique("dropping"))
    await backend.start()
    yield backend
    await backend.stop()


async def test_a_request_the_backend_drops_is_requeued_once_then_answered_502(
    processes: Processes, sender: Service, token: str, dropping_backend: DroppingBackend
) -> None:
    model = dropping_backend.model
    consumer = stack.start_consumer(
        processes.log_dir,
        model=model,
        vllm_url=dropping_backend.url,
        rabbitmq_url=RABBITMQ_URL,
        name=f"consumer-{model}",
        dead_letter_queue=DEAD_LETTER_QUEUE,
        health_interval=0.2,
    )
    processes.services.append(consumer)
    processes.models.add(model)
    await wait_listed(sender, token, model)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        response = await http.post("/v1/completions", json={"model": model, "prompt": "x"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "backend_unavailable"
    assert dropping_backend.posts == 2  # the first try, then the redelivered copy: no loop, no loss
    _, samples = await scrape(consumer)
    assert total(samples, "consumer_requests_total", outcome="requeued") == 1
    assert total(samples, "consumer_requests_total", outcome="answered", status="502") == 1
    await wait_listed(sender, token, model)  # consuming again once its health check passes
