"""Only the relayed routes reach a backend, exactly; client strings are not echoed or labelled unbounded.

The backend here records every request line it receives. Every spelling of
vLLM's control routes that once got through (dot segments, percent-encoding,
double encoding, an encoded separator, a query string) is sent through a real
sender and consumer, and the backend must see only the allowed routes. The
consumer alone, given such paths straight on its queue, must refuse them too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import httpx
import orjson
import pytest
import pytest_asyncio

import contract
from contract import Reply, Request
from contract.routes import RELAYED_ROUTES
from harness.api import auth, wait_listed
from harness.observe import metrics_url, request_lines
from harness.processes import Processes
from harness.recording_backend import RecordingBackend
from harness.stack import Service
from harness.testrun import RABBITMQ_URL, unique

BYPASSES = [
    # Reproduced against the old code: each reached vLLM's control routes.
    "/v1/../reset_prefix_cache",
    "/v1/%2e%2e/sleep?level=1",
    "/v1/..%2fcollective_rpc",
    "/v1/models/../../start_profile",
    "/v1/%252e%252e/health",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    # Variants.
    "/v1/%2E%2E/wake_up",
    "/v1/..%5csleep",
    "/v1/.%2e/sleep",
    "/v1/chat/completions/../../sleep",
    "/v1/chat/completions/%2e%2e/%2e%2e/sleep",
    "/tokenize/../sleep",
    "/v1/./chat/completions",
    "/v1//chat/completions",
    "//v1/chat/completions",
    "/v1/chat/completions/",
    "/v1/chat/completions?x=1",
    "/v1/chat/completions%3Fx=1",
    "/v1/chat%2fcompletions",
    "/v1/chat/completion%73",
    "/v1/chat/completions%00",
    "/v1/chat/completions;x=1",
    "/v1/chat/completions/..;/sleep",
    "/V1/chat/completions",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/start_profile",
    "/stop_profile",
    "/scale_elastic_ep",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/responses/resp_1/cancel",
    "/v1/audio/transcriptions",
]
REFUSAL_CODES = {"invalid_path", "unknown_url", "method_not_allowed"}


async def raw_request(
    address: tuple[str, int], method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with the target exactly as given (httpx would normalise it)."""
    reader, writer = await asyncio.open_connection(*address)
    head = [f"{method} {target} HTTP/1.1", "Host: dispatcher", "Connection: close"]
    head += [f"{name}: {value}" for name, value in headers]
    head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(-1), 30)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    header_block, _, content = rest.partition(b"\r\n\r\n")
    fields: dict[str, str] = {}
    for line in header_block.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields, content


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingBackend]:
    backend = RecordingBackend(unique("routes"))
    yield backend
    backend.close()


@pytest_asyncio.fixture(scope="module")
async def routed_model(processes: Processes, sender: Service, token: str, recorder: RecordingBackend) -> str:
    processes.consumer(recorder.model, recorder)
    await wait_listed(sender, token, recorder.model)
    return recorder.model


async def test_only_allowed_routes_reach_the_backend(
    sender: Service, token: str, routed_model: str, recorder: RecordingBackend
) -> None:
    body = orjson.dumps({"model": routed_model, "prompt": "x"})
    headers = list(auth(token).items())
    host, port = sender.address
    for target in [*BYPASSES, f"http://{host}:{port}/sleep"]:
        status, _, content = await raw_request(sender.address, "POST", target, headers, body)
        assert status in (400, 404, 405), (target, status, content)
        assert orjson.loads(content)["error"]["code"] in REFUSAL_CODES, (target, content)
    assert recorder.posted() == []
    for route in sorted(RELAYED_ROUTES):
        status, _, content = await raw_request(sender.address, "POST", route, headers, body)
        assert status == 200, (route, content)
        assert orjson.loads(content) == {"object": "recorded", "target": route}
    assert recorder.posted() == sorted(RELAYED_ROUTES)


async def test_path_errors_say_why_before_reading_the_body(sender: Service, token: str) -> None:
    headers = list(auth(token).items())
    # A body announced and never sent: the answer does not wait for it.
    reader, writer = await asyncio.open_connection(*sender.address)
    writer.write(
        f"POST /v1/%2e%2e/sleep HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(
        next(
            v
            for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        )
    )
    answer = head + await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b'"invalid_path"' in answer and b"percent-encoding" in answer
    status, _, content = await raw_request(sender.address, "POST", "/v1/chat/completions?x=1", headers)
    assert status == 400 and b"query string" in content
    status, _, content = await raw_request(sender.address, "POST", "/v1/../sleep", headers)
    assert status == 400 and b"dot segment" in content


async def test_other_methods_on_a_relayed_route_get_405_with_allow(sender: Service, token: str) -> None:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http:
        for method in ("GET", "PUT", "DELETE"):
            response = await http.request(method, "/v1/chat/completions")
            assert response.status_code == 405, response.text
            assert response.headers["allow"] == "POST"
            assert response.json()["error"]["code"] == "method_not_allowed"
        models = await http.post("/v1/models", json={"model": "x"})
        assert models.status_code == 405 and models.headers["allow"] == "GET"


async def test_the_consumer_alone_refuses_paths_that_are_not_routes(
    routed_model: str, recorder: RecordingBackend
) -> None:
    """Published straight to the model queue, as a sender that was bypassed would: answered 404,
    and the backend never called."""
    refused = [
        "/reset_prefix_cache",
        "/v1/../sleep",
        "/v1/%2e%2e/sleep",
        "/v1/..%2fcollective_rpc",
        "/v1/load_lora_adapter",
        "/v1/chat/completions?x=1",
        "/v1/chat/completions/",
        "/v1/completions/../../start_profile",
    ]
    before = recorder.posted()
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        for path in [*refused, "/v1/completions"]:
            request = Request(
                path=path,
                body=orjson.dumps({"model": routed_model}),
                stream=False,
                priority=1,
                deadline=time.time() + 30,
                request_id=path,
                correlation_id=uuid.uuid4().hex,
                reply_to=replies.name,
            )
            await channel.default_exchange.publish(
                request.message(), routing_key=contract.model_queue(routed_model)
            )
            incoming = await _next(replies)
            reply = Reply.from_amqp(incoming.headers, incoming.body, incoming.content_type)
            assert reply.last
            if path == "/v1/completions":
                assert reply.status == 200
            else:
                assert reply.status == 404, (path, reply)
                assert orjson.loads(reply.body)["error"]["code"] == "unknown_url"
    assert recorder.posted()[len(before) :] == ["/v1/completions"]


async def _next(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    for _ in range(200):
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    raise AssertionError("no reply within 10 s")


async def test_duplicate_authorization_is_refused_in_either_order(
    sender: Service, token: str, routed_model: str
) -> None:
    body = {"model": routed_model, "prompt": "x"}
    valid, invalid = f"Bearer {token}", "Bearer sk-not-a-token"
    async with httpx.AsyncClient(base_url=sender.url) as http:
        for pair in ((valid, invalid), (invalid, valid), (valid, valid)):
            headers = [("Authorization", value) for value in pair]
            for response in (
                await http.post("/v1/completions", json=body, headers=headers),
                await http.get("/v1/models", headers=headers),
            ):
                assert response.status_code == 400, (pair, response.text)
                assert response.json()["error"]["code"] == "duplicate_authorization"
        assert (
            await http.post("/v1/completions", json=body, headers=[("Authorization", valid)])
        ).status_code == 200


@pytest_asyncio.fixture(scope="module")
async def roomy_sender(processes: Processes) -> AsyncIterator[Service]:
    """A sender of its own (its metrics count only this module's requests) that takes 4 MiB bodies."""
    yield processes.sender("postgres", max_body_bytes=4 * 1024 * 1024)


async def test_huge_client_strings_are_not_echoed(
    roomy_sender: Service, token: str, routed_model: str
) -> None:
    name = "m" * (1024 * 1024)
    async with httpx.AsyncClient(base_url=roomy_sender.url, headers=auth(token), timeout=30) as http:
        request_id = uuid.uuid4().hex
        response = await http.post(
            "/v1/completions", json={"model": name, "prompt": "x"}, headers={"X-Request-Id": request_id}
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert len(response.content) < 500, len(response.content)
        assert "1048576 characters" in response.json()["error"]["message"]
        for _ in range(50):
            lines = request_lines(roomy_sender, request_id)
            if lines:
                break
            await asyncio.sleep(0.1)
        assert len(orjson.dumps(lines)) < 1000, len(orjson.dumps(lines))
        # A long model name in the path, a long path, a long request id.
        card = await http.get("/v1/models/" + "m" * 10_000)
        assert card.status_code == 404 and len(card.content) < 500
        unknown = await http.post("/v1/" + "p" * 10_000, json={"model": routed_model})
        assert unknown.status_code == 404 and len(unknown.content) < 500
        long_id = await http.post(
            "/v1/completions", json={"model": routed_model}, headers={"X-Request-Id": "r" * 10_000}
        )
        assert long_id.headers["x-request-id"] == "r" * 64


async def test_made_up_model_names_add_no_metric_series(roomy_sender: Service, token: str) -> None:
    async with httpx.AsyncClient(base_url=roomy_sender.url, headers=auth(token), timeout=30) as http:
        await http.post("/v1/completions", json={"model": "warm-up-name"})  # the _unknown series exist

        async def lines() -> int:
            return len((await http.get(metrics_url(roomy_sender))).text.splitlines())

        before = await lines()
        prefix = f"made-up-{uuid.uuid4().hex[:6]}"
        names = iter(f"{prefix}-{i}" for i in range(2000))

        async def client() -> None:
            for name in names:
                response = await http.post("/v1/completions", json={"model": name, "prompt": "x"})
                assert response.status_code == 404

        await asyncio.gather(*(client() for _ in range(16)))
        text = (await http.get(metrics_url(roomy_sender))).text
        after = len(text.splitlines())
    print(f"/metrics: {before} lines before 2,000 made-up model names, {after} after")
    assert prefix not in text
    assert 'model="_unknown"' in text
    assert after - before <= 10, (before, after)
