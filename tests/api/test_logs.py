"""One JSON log line per request at each service, joined by the request id; no secret in any log."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from harness.api import auth
from harness.observe import request_lines
from harness.stack import Service


async def test_request_id_travels_from_sender_log_to_consumer_log(
    sender: Service, consumer: Service, ready_model: str, token: str
) -> None:
    request_id = f"trace-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=sender.url) as http:
        response = await http.post(
            "/v1/completions",
            json={"model": ready_model, "prompt": "hi", "max_tokens": 2},
            headers={**auth(token), "X-Request-Id": request_id},
        )
        refused = await http.post("/v1/completions", json={"model": ready_model}, headers=auth(token + "x"))
    assert response.headers["x-request-id"] == request_id
    assert refused.headers["x-request-id"]
    for _ in range(50):  # log lines are written as the requests end
        refused_id = refused.headers["x-request-id"]
        if all(
            (
                request_lines(sender, request_id),
                request_lines(consumer, request_id),
                request_lines(sender, refused_id),
            )
        ):
            break
        await asyncio.sleep(0.05)
    [sent] = request_lines(sender, request_id)
    [served] = request_lines(consumer, request_id)
    assert sent["status"] == 200 and sent["model"] == ready_model and sent["token"]
    assert served["status"] == 200 and served["outcome"] == "answered"
    assert isinstance(served["queue_ms"], float)
    refused_line = request_lines(sender, refused.headers["x-request-id"])
    assert refused_line and refused_line[0]["status"] == 401 and refused_line[0]["code"] == "invalid_api_key"
    for service in (sender, consumer):
        text = service.log_path.read_text(errors="replace")
        assert token not in text, f"a token secret appears in the {service.name} log"
