"""Bad input never gets a 5xx from the sender's own code, and every error is OpenAI-shaped.

The inputs a fuzzer does not make (the description itself is fuzzed by
test_openapi.py): huge headers, a client that sends its body slowly or never,
invalid UTF-8, content types that are not JSON; a client whose body stalls
past the body timeout, and one that leaves in the middle of its body.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from harness.api import auth
from harness.observe import metrics_url, request_lines
from harness.processes import Processes
from harness.stack import Service


def openai_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/json"), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if status is not None:
        assert response.status_code == status, response.text
    return dict(error)


async def test_huge_headers_are_refused_cleanly(sender: Service, token: str) -> None:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=10) as http:
        try:
            response = await http.post(
                "/v1/completions", json={"model": "m"}, headers={"X-Junk": "x" * 200_000}
            )
        except httpx.RemoteProtocolError:
            pass  # the server dropped the connection: refused, without a crash
        else:
            assert openai_error(response, 431)["code"] == "request_header_fields_too_large"
        # And the sender is still there.
        assert (await http.get("/health/live")).status_code == 200


async def test_model_names_that_cannot_be_queue_names_are_unknown(sender: Service, token: str) -> None:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=10) as http:
        for model in ("\u00e9t\u00e9", "a" * 300, "x\ny", "{}"):
            response = await http.post("/v1/completions", json={"model": model})
            assert openai_error(response, 404)["code"] == "model_not_found", model


async def test_invalid_utf8_and_other_content_types(sender: Service, token: str, ready_model: str) -> None:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=10) as http:
        bad_utf8 = await http.post("/v1/completions", content=b'{"model": "\xff\xfe", "prompt": "\xc3\x28"}')
        assert openai_error(bad_utf8, 400)["code"] == "invalid_json"
        for content_type, body in (
            ("text/plain", b"hello"),
            ("application/x-www-form-urlencoded", b"model=demo&prompt=x"),
            ("multipart/form-data; boundary=x", b"--x\r\n\r\n--x--"),
            ("application/octet-stream", bytes(range(256))),
        ):
            response = await http.post(
                "/v1/completions", content=body, headers={"content-type": content_type}
            )
            assert openai_error(response, 400)["code"] == "invalid_json", content_type
        # A JSON body under another content type is still a JSON body: it is served.
        served = await http.post(
            "/v1/completions",
            content=b'{"model": "%s", "prompt": "x", "max_tokens": 2}' % ready_model.encode(),
            headers={"content-type": "text/plain"},
        )
        assert served.status_code == 200


async def test_slow_and_silent_clients_do_not_hold_the_sender(sender: Service, token: str) -> None:
    """A client that sends headers and then its body a byte at a time, or never, costs one connection;
    everyone else is still served."""
    host, port = sender.address
    writers = []
    for _ in range(50):
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        await writer.drain()
        writers.append(writer)
    try:
        async with httpx.AsyncClient(base_url=sender.url, timeout=10) as http:
            for _ in range(3):
                assert (await http.get("/health/live")).status_code == 200
                for writer in writers:
                    writer.write(b" ")
                await asyncio.sleep(0.1)
            response = await http.post("/v1/completions", headers=auth(token), content=b"{")
            assert openai_error(response, 400)["code"] == "invalid_json"
    finally:
        for writer in writers:
            writer.close()


@pytest.fixture(scope="module")
def impatient_sender(processes: Processes) -> Service:
    """A sender that waits one second at most for a request's whole body."""
    return processes.sender("postgres", body_timeout_seconds=1)


async def send_part_of_a_body(
    sender: Service, token: str, request_id: str, part: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Headers announcing a 1000-byte body, then only ``part`` of it, over a raw connection."""
    host, port = sender.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"X-Request-Id: {request_id}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
        + part
    )
    await writer.drain()
    return reader, writer


def parse_response(raw: bytes) -> httpx.Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [
        (name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in header_lines)
    ]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


async def logged(service: Service, request_id: str, timeout: float = 5) -> dict[str, object]:
    """The service's log line for the request, once written (after the answer is sent)."""
    deadline = time.monotonic() + timeout
    while not (lines := request_lines(service, request_id)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{service.name} never logged request {request_id}")
        await asyncio.sleep(0.05)
    [line] = lines
    return line


async def test_a_stalled_body_gets_408_and_is_never_queued(
    impatient_sender: Service, consumer: Service, ready_model: str, token: str
) -> None:
    request_id = f"stalled-{uuid.uuid4().hex}"
    started = time.monotonic()
    reader, writer = await send_part_of_a_body(
        impatient_sender, token, request_id, b'{"model": "%s", "prompt": "' % ready_model.encode()
    )
    try:
        async with asyncio.timeout(10):  # a sender without a body timeout would wait forever
            raw = await reader.read()  # the answer, then the sender closes the connection
    finally:
        writer.close()
    assert time.monotonic() - started < 5
    response = parse_response(raw)
    assert openai_error(response, 408)["code"] == "request_timeout"
    assert response.headers["connection"] == "close"
    line = await logged(impatient_sender, request_id)
    assert line["status"] == 408 and "model" not in line  # refused before admission
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(metrics_url(impatient_sender))).text
    assert 'dispatcher_rejected_requests_total{reason="slow_client"} 1.0' in metrics
    await asyncio.sleep(0.2)
    assert not request_lines(consumer, request_id)


async def test_a_client_that_leaves_mid_body_is_dropped_quietly(
    impatient_sender: Service, token: str
) -> None:
    request_id = f"gone-{uuid.uuid4().hex}"
    _reader, writer = await send_part_of_a_body(impatient_sender, token, request_id, b'{"model": ')
    await asyncio.sleep(0.2)
    writer.close()
    line = await logged(impatient_sender, request_id)
    assert line["level"] == "info" and line["code"] == "client_disconnected", line
    entries = [orjson.loads(text) for text in impatient_sender.log_path.read_text().splitlines()]
    assert not [entry for entry in entries if entry["level"] in ("error", "critical") or "exc" in entry]
