"""The dispatch path end to end: OpenAI SDK and raw HTTP -> sender -> RabbitMQ -> consumer -> simulator."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import openai
import orjson
import pytest

from harness.api import auth
from harness.observe import request_lines, scrape, total
from harness.stack import Service

CHAT = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 6}


@pytest.fixture
def client(sender: Service, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0)


async def test_chat_completion_through_the_sdk(client: openai.AsyncOpenAI, ready_model: str) -> None:
    completion = await client.chat.completions.create(model=ready_model, **CHAT)  # type: ignore[call-overload]
    assert completion.model == ready_model
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6


async def test_streamed_chat_matches_the_backend(
    client: openai.AsyncOpenAI, ready_model: str, simulator: Service
) -> None:
    stream = await client.chat.completions.create(
        model=ready_model,
        stream=True,
        stream_options={"include_usage": True},
        **CHAT,  # type: ignore[call-overload]
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    direct = openai.AsyncOpenAI(base_url=simulator.url + "/v1", api_key="unused", max_retries=0)
    expected = await direct.chat.completions.create(model=ready_model, **CHAT)  # type: ignore[call-overload]
    assert text == expected.choices[0].message.content


async def test_raw_stream_is_server_sent_events(sender: Service, token: str, ready_model: str) -> None:
    body = {"model": ready_model, "stream": True, **CHAT}
    async with (
        httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1] == b"data: [DONE]"
    assert b'"usage"' not in raw.split(b"data: [DONE]")[0].split(b"\n\n")[-2]


async def test_completions_and_embeddings(client: openai.AsyncOpenAI, ready_model: str) -> None:
    completion = await client.completions.create(model=ready_model, prompt="Once upon", max_tokens=4)
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    embedding = await client.embeddings.create(model=ready_model, input=["a", "b"])
    assert len(embedding.data) == 2 and embedding.data[0].embedding


async def test_models_list_and_retrieve(
    client: openai.AsyncOpenAI, ready_model: str, simulator: Service
) -> None:
    listed = await client.models.list()
    entry = next(m for m in listed.data if m.id == ready_model)
    assert entry.object == "model"
    async with httpx.AsyncClient() as http:
        backend = (await http.get(simulator.url + "/v1/models")).json()["data"][0]
    assert entry.model_extra is not None and entry.model_extra["max_model_len"] == backend["max_model_len"]
    assert entry.model_extra["status"] == "ready"  # beside sleeping models; OpenAI clients ignore it
    retrieved = await client.models.retrieve(ready_model)
    assert retrieved.id == ready_model
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_tokenize_and_detokenize(sender: Service, token: str, ready_model: str) -> None:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http:
        tokens = await http.post("/tokenize", json={"model": ready_model, "prompt": "hello"})
        assert tokens.status_code == 200
        ids = tokens.json()["tokens"]
        assert tokens.json()["count"] == len(ids) > 0
        text = await http.post("/detokenize", json={"model": ready_model, "tokens": ids})
        assert text.json()["prompt"] == "hello"


async def test_backend_errors_come_back_untouched(
    sender: Service, token: str, ready_model: str, simulator: Service
) -> None:
    too_long = {"model": ready_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}
    async with httpx.AsyncClient() as http:
        direct = await http.post(simulator.url + "/v1/chat/completions", json=too_long)
        relayed = await http.post(sender.url + "/v1/chat/completions", json=too_long, headers=auth(token))
        streamed = await http.post(
            sender.url + "/v1/chat/completions", json={**too_long, "stream": True}, headers=auth(token)
        )
    assert direct.status_code == 400
    assert relayed.status_code == 400
    assert relayed.content == direct.content
    assert relayed.headers["content-type"] == direct.headers["content-type"]
    assert streamed.status_code == 400
    assert streamed.json()["error"]["message"] == direct.json()["error"]["message"]


async def test_sdk_raises_the_backend_error(client: openai.AsyncOpenAI, ready_model: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model=ready_model, messages=[{"role": "user", "content": "x"}], max_tokens=10**6
        )
    assert "cannot be greater than max_model_len" in str(caught.value)


def _is_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "type" in error and "code" in error
    return dict(error)


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, {"model": "m"}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer sk-wrong"}, {"model": "m"}, 401, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, {"model": "m"}, 401, "invalid_api_key"),
        (None, b"{not json", 400, "invalid_json"),
        (None, b"[1, 2]", 400, "invalid_json"),
        (None, {"messages": []}, 400, "missing_model"),
        (None, {"model": 42}, 400, "missing_model"),
        (None, {"model": "no-such-model-anywhere"}, 404, "model_not_found"),
    ],
)
async def test_bad_requests_get_openai_errors(
    sender: Service, token: str, headers: dict[str, str] | None, body: object, status: int, code: str
) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    async with httpx.AsyncClient(base_url=sender.url) as http:
        response = await http.post(
            "/v1/chat/completions", content=content, headers=auth(token) if headers is None else headers
        )
    assert _is_openai_error(response, status)["code"] == code


async def test_bad_priority_header(sender: Service, token: str, ready_model: str) -> None:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http:
        response = await http.post(
            "/v1/chat/completions", json={"model": ready_model, **CHAT}, headers={"X-Priority": "high"}
        )
    assert _is_openai_error(response, 400)["code"] == "invalid_priority"


async def test_body_too_large(sender: Service, token: str, ready_model: str) -> None:
    huge = orjson.dumps({"model": ready_model, "prompt": "x" * (2 * 1024 * 1024)})
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http:
        response = await http.post("/v1/completions", content=huge)
    assert _is_openai_error(response, 413)["code"] == "request_too_large"


async def test_models_need_a_token(sender: Service) -> None:
    async with httpx.AsyncClient(base_url=sender.url) as http:
        _is_openai_error(await http.get("/v1/models"), 401)
        _is_openai_error(await http.get("/v1/models", headers=auth("sk-nope")), 401)


async def test_unknown_route_and_method(sender: Service, token: str) -> None:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http:
        _is_openai_error(await http.get("/nowhere"), 404)
        _is_openai_error(await http.delete("/v1/models"), 405)


async def test_health_endpoints(sender: Service) -> None:
    async with httpx.AsyncClient(base_url=sender.url) as http:
        assert (await http.get("/health/live")).status_code == 200
        ready = await http.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "broker": True, "database": True}


async def test_health_answers_where_vllm_tools_look(sender: Service) -> None:
    """guidellm and other tools validate a vLLM endpoint with ``GET /health``, without a token."""
    async with httpx.AsyncClient(base_url=sender.url) as http:
        health = await http.get("/health")
        ready = await http.get("/health/ready")
    assert health.status_code == ready.status_code == 200
    assert health.json()["status"] == "ok"


async def test_refusals_on_the_model_list_are_counted_and_logged(sender: Service) -> None:
    request_id = f"models-refused-{uuid.uuid4().hex[:8]}"
    _, before = await scrape(sender)
    async with httpx.AsyncClient(base_url=sender.url) as http:
        _is_openai_error(await http.get("/v1/models", headers={"X-Request-Id": request_id}), 401)
    _, after = await scrape(sender)
    reason = "dispatcher_rejected_requests_total"
    assert total(after, reason, reason="auth") == total(before, reason, reason="auth") + 1
    for _ in range(50):
        lines = request_lines(sender, request_id)
        if lines:
            break
        await asyncio.sleep(0.1)
    assert [(line["path"], line["status"], line["code"]) for line in lines] == [
        ("/v1/models", 401, "invalid_api_key")
    ]
