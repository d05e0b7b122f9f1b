"""The simulator on its own: vLLM's shapes, its scheduling, and slots freed by clients that leave.

Each test serves the app with a real uvicorn on a free port inside the test's
event loop, so streaming and disconnects go through a real socket.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn

from simulator import SimulatorSettings, create_app
from simulator.engine import Engine
from simulator.tokenizer import chat_prompt

FAST: dict[str, Any] = {"model": "sim", "ttft_ms": 5, "itl_ms": 2, "default_max_tokens": 4}
CHAT: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "Hello there"}]}
ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def serve(**options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A simulator with ``options`` on a free port, and a client for it."""
    settings = SimulatorSettings(**{**FAST, **options})
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on such sockets, else Nagle adds 40 ms a reply.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), lifespan="on", access_log=False, log_config=None, http="httptools"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), "the simulator did not start"
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        await task
        sock.close()


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """``/metrics`` samples by name (labels dropped)."""
    values = {}
    for line in (await client.get("/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{", 1)[0]] = float(value)
    return values


async def wait_metrics(client: httpx.AsyncClient, timeout: float = 5, **expected: float) -> dict[str, float]:
    """Poll until every ``name=value`` (``:`` written as ``__``) holds; fail with the last reading."""
    wanted = {name.replace("__", ":"): value for name, value in expected.items()}
    deadline = time.monotonic() + timeout
    while True:
        current = await metrics(client)
        if all(current.get(name) == value for name, value in wanted.items()):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never reached {wanted}: {current}")
        await asyncio.sleep(0.005)


def events(raw: bytes) -> list[bytes]:
    parts = raw.split(b"\n\n")
    assert parts[-1] == b"", "a stream ends with a complete event"
    assert all(part.startswith(b"data: ") for part in parts[:-1])
    return [part[len(b"data: ") :] for part in parts[:-1]]


async def test_health_and_models() -> None:
    async with serve(max_model_len=1000) as client:
        health = await client.get("/health")
        assert health.status_code == 200 and health.content == b""
        listed = (await client.get("/v1/models")).json()
    assert listed["object"] == "list"
    (card,) = listed["data"]
    assert card["id"] == card["root"] == "sim"
    assert card["object"] == "model" and card["owned_by"] == "vllm" and card["parent"] is None
    assert card["max_model_len"] == 1000 and isinstance(card["created"], int)
    assert card["permission"][0]["object"] == "model_permission"


async def test_chat_and_completion_usage() -> None:
    async with serve() as client:
        chat = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        by_new_name = await client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 2})
        completion = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5})
        default = await client.post("/v1/completions", json={"model": "sim", "prompt": [104, 105]})
        counted = (await client.post("/tokenize", json=CHAT)).json()["count"]
        seen = await metrics(client)
    assert chat.status_code == 200 and chat.headers["content-type"] == "application/json"
    body = chat.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "sim"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and len(choice["message"]["content"].split()) == 3
    assert choice["finish_reason"] == "length"
    prompt_tokens = len(chat_prompt(CHAT["messages"]).encode())
    assert prompt_tokens == counted
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3,
        "total_tokens": prompt_tokens + 3,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    assert by_new_name.json()["usage"]["completion_tokens"] == 2
    text = completion.json()
    assert text["id"].startswith("cmpl-") and text["object"] == "text_completion"
    assert len(text["choices"][0]["text"].split()) == 5
    assert text["usage"]["prompt_tokens"] == 5 and text["usage"]["completion_tokens"] == 5
    assert default.json()["usage"] == {
        **text["usage"],
        "prompt_tokens": 2,
        "total_tokens": 6,
        "completion_tokens": 4,
    }
    assert seen["vllm:request_success_total"] == 4
    assert seen["vllm:generation_tokens_total"] == 3 + 2 + 5 + 4
    assert seen["vllm:prompt_tokens_total"] == 2 * prompt_tokens + 5 + 2


async def test_streamed_chat_is_vllm_sse() -> None:
    request = {**CHAT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    async with serve() as client:
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            raw = b"".join([part async for part in response.aiter_bytes()])
        whole = (await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})).json()
    *chunks, done = events(raw)
    assert done == b"[DONE]"
    parsed = [orjson.loads(chunk) for chunk in chunks]
    assert {chunk["id"] for chunk in parsed} == {parsed[0]["id"]}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in parsed)
    assert parsed[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    tokens, usage = parsed[1:-1], parsed[-1]
    assert len(tokens) == 4
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None, None, None, "length"]
    assert all("usage" not in t for t in tokens)
    assert (
        "".join(t["choices"][0]["delta"]["content"] for t in tokens)
        == whole["choices"][0]["message"]["content"]
    )
    assert usage["choices"] == [] and usage["system_fingerprint"] == whole["system_fingerprint"]
    counts = ("prompt_tokens", "total_tokens", "completion_tokens")
    assert usage["usage"] == {key: whole["usage"][key] for key in counts}
    assert all("system_fingerprint" not in t for t in tokens)


async def test_streamed_completion_without_usage() -> None:
    async with serve() as client:
        response = await client.post(
            "/v1/completions", json={"prompt": "abc", "max_tokens": 3, "stream": True}
        )
    *chunks, done = events(response.content)
    assert done == b"[DONE]"
    parsed = [orjson.loads(chunk) for chunk in chunks]
    assert len(parsed) == 3
    assert all(c["object"] == "text_completion" and "usage" not in c for c in parsed)
    assert [c["choices"][0]["finish_reason"] for c in parsed] == [None, None, "length"]
    # With no usage chunk to carry it, the last chunk names the system, as vLLM's does.
    assert ["system_fingerprint" in c for c in parsed] == [False, False, True]
    assert len("".join(c["choices"][0]["text"] for c in parsed).split()) == 3


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


async def test_errors_have_vllm_shapes() -> None:
    async with serve(max_model_len=100) as client:
        too_long = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 101})
        shortened = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 90})
        prompt_too_long = await client.post("/v1/completions", json={"prompt": "x" * 100})
        wrong_model = await client.post("/v1/chat/completions", json={**CHAT, "model": "other"})
        priority = await client.post("/v1/chat/completions", json={**CHAT, "priority": 3})
        stream_options = await client.post("/v1/completions", json={"prompt": "x", "stream_options": {}})
        bad = [
            await client.post("/v1/completions", json={"model": "sim"}),
            await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}),
            await client.post("/v1/completions", json={"prompt": "x", "stream_options": {"a": 1}}),
        ]
        invalid = [
            await client.post("/v1/chat/completions", content=b"{not json"),
            await client.post("/v1/chat/completions", content=b"[1, 2]"),
            await client.post("/v1/chat/completions", json={"model": "sim"}),
            await client.post("/v1/chat/completions", json={"model": "sim", "messages": "x"}),
            await client.post("/v1/completions", json={"prompt": "x", "max_tokens": "5"}),
            await client.post("/v1/completions", json={"prompt": "x", "priority": "high"}),
        ]
        unknown = await client.get("/v1/nowhere")
        wrong_method = await client.get("/v1/chat/completions")
        still_served = await client.post("/v1/chat/completions", json=CHAT)
    prompt_tokens = len(chat_prompt(CHAT["messages"]).encode())
    assert error_of(too_long, 400) == {
        "message": "max_tokens=101 cannot be greater than max_model_len=100. Please request fewer output "
        "tokens. (parameter=max_tokens, value=101)",
        "type": "BadRequestError",
        "param": "max_tokens",
        "code": 400,
    }
    # Like vLLM 0.32: a completion that does not fit after the prompt is shortened, not refused.
    assert shortened.status_code == 200
    assert shortened.json()["usage"]["completion_tokens"] == 100 - prompt_tokens
    long_prompt = error_of(prompt_too_long, 400)
    assert "maximum context length is 100 tokens" in long_prompt["message"]
    assert long_prompt["param"] == "input_tokens"
    missing = error_of(wrong_model, 404)
    assert missing == {
        "message": "The model `other` does not exist. Valid aliases: sim.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    # Without the priority policy, vLLM ignores a request's priority.
    assert priority.status_code == 200
    assert stream_options.status_code == 200
    for response in bad:
        assert error_of(response, 400)["type"] == "BadRequestError"
    for response in invalid:
        error = error_of(response, 400)
        assert error["type"] == "Bad Request" and error["param"].startswith("body")
    assert unknown.status_code == 404 and unknown.json() == {"detail": "Not Found"}
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert still_served.status_code == 200


async def test_tokenize_detokenize_and_embeddings() -> None:
    async with serve() as client:
        tokens = (await client.post("/tokenize", json={"model": "sim", "prompt": "héllo"})).json()
        text = (await client.post("/detokenize", json={"model": "sim", "tokens": tokens["tokens"]})).json()
        wrong = await client.post("/tokenize", json={"model": "nope", "prompt": "x"})
        single = (await client.post("/v1/embeddings", json={"model": "sim", "input": "a"})).json()
        batch = (await client.post("/v1/embeddings", json={"input": ["a", "bb"]})).json()
        packed = (
            await client.post("/v1/embeddings", json={"input": "a", "encoding_format": "base64"})
        ).json()
    assert tokens["count"] == len(tokens["tokens"]) == 6 and tokens["max_model_len"] == 4096
    assert text == {"prompt": "héllo"}
    error_of(wrong, 404)
    assert single["object"] == "list" and single["data"][0]["object"] == "embedding"
    vector = single["data"][0]["embedding"]
    assert len(vector) == 8 and abs(sum(v * v for v in vector) - 1) < 1e-9
    assert batch["data"][0]["embedding"] == vector and batch["data"][1]["embedding"] != vector
    assert [d["index"] for d in batch["data"]] == [0, 1]
    assert batch["usage"]["prompt_tokens"] == 3 and batch["usage"]["completion_tokens"] == 0
    assert isinstance(packed["data"][0]["embedding"], str)


async def test_batch_limit_makes_requests_wait() -> None:
    async with serve(max_num_seqs=2, ttft_ms=5, itl_ms=20) as client:
        calls = [
            asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 15}))
            for _ in range(4)
        ]
        during = await wait_metrics(client, vllm__num_requests_running=2, vllm__num_requests_waiting=2)
        answers = await asyncio.gather(*calls)
        after = await metrics(client)
    assert during["vllm:kv_cache_usage_perc"] == 1.0
    assert all(answer.status_code == 200 for answer in answers)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:request_success_total"] == 4


async def test_priority_policy_orders_the_waiting_queue() -> None:
    finished: list[int] = []

    async def call(client: httpx.AsyncClient, priority: int, max_tokens: int) -> None:
        body = {"prompt": "x", "max_tokens": max_tokens, "priority": priority}
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        finished.append(priority)

    async with serve(max_num_seqs=1, scheduling_policy="priority", itl_ms=10) as client:
        blocker = asyncio.create_task(call(client, 100, 80))
        await wait_metrics(client, vllm__num_requests_running=1)
        waiting = []
        for position, priority in enumerate((5, -1, 3, 5, 0), start=1):
            waiting.append(asyncio.create_task(call(client, priority, 1)))
            await wait_metrics(client, vllm__num_requests_waiting=position)
        await asyncio.gather(blocker, *waiting)
    assert finished == [100, -1, 0, 3, 5, 5]


async def test_client_leaving_a_stream_frees_its_slot() -> None:
    async with serve(max_num_seqs=1, itl_ms=10) as client:
        request = {"prompt": "x", "max_tokens": 200, "stream": True}
        async with client.stream("POST", "/v1/completions", json=request) as response:
            received = 0
            async for chunk in response.aiter_bytes():
                received += chunk.count(b"data: ")
                if received >= 3:
                    break
        after = await wait_metrics(client, simulator__requests_aborted_total=1, vllm__num_requests_running=0)
        follow_up = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert 3 <= after["simulator:generation_tokens_aborted_total"] < 50
    assert after["vllm:generation_tokens_total"] == after["simulator:generation_tokens_aborted_total"]
    assert after["vllm:request_success_total"] == 0
    assert follow_up.status_code == 200


async def test_client_leaving_a_plain_request_frees_its_slot_and_queue_place() -> None:
    async with serve(max_num_seqs=1, itl_ms=10) as client:
        long = {"prompt": "x", "max_tokens": 300}
        running = asyncio.create_task(client.post("/v1/completions", json=long))
        await wait_metrics(client, vllm__num_requests_running=1)
        queued = asyncio.create_task(client.post("/v1/completions", json=long))
        await wait_metrics(client, vllm__num_requests_waiting=1)
        queued.cancel()
        await wait_metrics(client, vllm__num_requests_waiting=0, simulator__requests_aborted_total=1)
        await asyncio.sleep(0.1)
        assert (await metrics(client))["vllm:generation_tokens_total"] >= 5, "counts tokens as they are due"
        running.cancel()
        after = await wait_metrics(client, vllm__num_requests_running=0, simulator__requests_aborted_total=2)
    assert 1 <= after["simulator:generation_tokens_aborted_total"] < 100
    assert after["vllm:request_success_total"] == 0


async def test_engine_timing_follows_ttft_and_itl() -> None:
    engine = Engine(max_num_seqs=1, ttft=0.05, itl=0.02)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    async with engine.sequence(prompt_tokens=3, max_tokens=6) as sequence:
        times = [loop.time() - begin async for _ in sequence.stream()]
    assert times[0] >= 0.05 and times[-1] >= 0.05 + 5 * 0.02
    assert times[-1] < 0.5
    begin = loop.time()
    async with engine.sequence(prompt_tokens=3, max_tokens=6) as sequence:
        await sequence.run()
    assert 0.15 <= loop.time() - begin < 0.5
    assert engine.stats.requests_finished == 2 and engine.stats.generation_tokens == 12
    assert engine.running == 0


def test_module_runs_and_stops_cleanly_on_sigterm() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "SIMULATOR_PORT": str(port), "SIMULATOR_MODEL": "from-env"}
    process = subprocess.Popen([sys.executable, "-m", "simulator"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models")
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the simulator did not start"
                time.sleep(0.05)
        assert models.json()["data"][0]["id"] == "from-env"
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
