"""The broker's limits, on a private node: channels per connection, message size, the sender's memory.

One private RabbitMQ node (``harness/broker_node.py``) with a small ``max_message_size`` (1 MiB)
serves the whole module, so an answer "larger than one message" costs a few MiB, not 128.
The sender and the consumer are told the same limit (``*_BROKER_MAX_MESSAGE_SIZE``).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import aio_pika
import httpx
import orjson
import pytest

import contract
from harness.api import auth, wait_listed
from harness.broker_node import BrokerNode
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import Tokens, unique
from harness.traffic import one_request

MAX_MESSAGE = 1024 * 1024
"""The private node's ``max_message_size``."""
BUFFER_BOUND = 4 * 1024 * 1024
"""The sender's ``SENDER_MAX_BUFFERED_REPLY_BYTES`` here."""
WORD = 6
"""About how many bytes of text the simulator makes per token (a streamed token is a ~200-byte event)."""
STREAM_TOKENS = 300_000
"""A streamed generation of about 60 MB, unless stopped."""


@pytest.fixture(scope="module")
def small_node() -> Iterator[BrokerNode]:
    node = BrokerNode(config=f"max_message_size = {MAX_MESSAGE}")
    node.start()
    try:
        yield node
    finally:
        node.stop()


@dataclass
class LimitStack:
    node: BrokerNode
    sender: Service
    model: str
    backend: Service
    consumer: Service
    paced_model: str
    """Streams about 10,000 tokens a second (some 2 MB/s): the sender's buffer can be watched filling."""
    paced_backend: Service
    paced_consumer: Service


@pytest.fixture(scope="module")
def limit_stack(processes: Processes, small_node: BrokerNode) -> Iterator[LimitStack]:
    model = unique("limits")
    # Tokens as fast as the simulator can make them, and room for answers of many MiB.
    backend = processes.simulator(
        model, name=f"simulator-{model}", max_num_seqs=32, ttft_ms=1, itl_ms=0, max_model_len=4_000_000
    )
    consumer = processes.consumer(
        model,
        backend,
        rabbitmq_url=small_node.url,
        broker_max_message_size=MAX_MESSAGE,
        flow="fixed",
        max_inflight=32,
    )
    paced_model = unique("limits-paced")
    paced_backend = processes.simulator(
        paced_model, name=f"simulator-{paced_model}", ttft_ms=1, itl_ms=0.1, max_model_len=4_000_000
    )
    paced_consumer = processes.consumer(
        paced_model, paced_backend, rabbitmq_url=small_node.url, broker_max_message_size=MAX_MESSAGE
    )
    sender = processes.sender(
        "postgres",
        rabbitmq_url=small_node.url,
        broker_max_message_size=MAX_MESSAGE,
        max_body_bytes=512 * 1024,
        max_buffered_reply_bytes=BUFFER_BOUND,
    )
    yield LimitStack(small_node, sender, model, backend, consumer, paced_model, paced_backend, paced_consumer)
    # Stopped with the module, so that they do not keep knocking on the stopped node until the end.
    for service in (sender, consumer, paced_consumer, backend, paced_backend):
        service.stop()


@pytest.mark.timeout(300)
async def test_made_up_model_names_keep_the_channel_count(limit_stack: LimitStack, tokens: Tokens) -> None:
    """2,000 requests for models that do not exist open no channel, and another user's streams
    running meanwhile all finish: the broker never comes near ``channel_max``."""
    sender, node = limit_stack.sender, limit_stack.node
    typist = await tokens.create("typist")
    streamer = await tokens.create("streamer")
    await wait_listed(sender, streamer, limit_stack.paced_model, timeout=30)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(typist), timeout=30) as http:
        # Warm up: the passive-declare channel exists, the known model was read once.
        assert (await http.post("/v1/completions", json={"model": "warm-up-typo"})).status_code == 404
        before = await asyncio.to_thread(node.channels_of, "sender-")
        assert before > 0, "the sender's connection is not on the node"
        started = time.monotonic()
        prefix = f"typo-{uuid.uuid4().hex[:6]}"
        names = iter(f"{prefix}-{i}" for i in range(2000))
        statuses: dict[int, int] = {}
        seen: list[int] = []
        typing_done = asyncio.Event()

        async def typist_client() -> None:
            for name in names:
                response = await http.post("/v1/completions", json={"model": name, "prompt": "x"})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        async def watch_channels() -> None:
            while not typing_done.is_set():
                # rabbitmqctl starts an Erlang VM each time: sampled seldom, to leave the CPU to the test.
                await asyncio.sleep(8)
                seen.append(await asyncio.to_thread(node.channels_of, "sender-"))

        outcomes: dict[str, int] = {}

        async def stream_client(stream_http: httpx.AsyncClient) -> None:
            while not typing_done.is_set():
                outcome, _ = await one_request(
                    stream_http, limit_stack.paced_model, stream=True, max_tokens=100, deadline=20
                )
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                await asyncio.sleep(0.1)  # a steady stream of streams, leaving the CPU to the typist

        async with httpx.AsyncClient(
            base_url=sender.url, headers=auth(streamer), timeout=None
        ) as stream_http:
            streams = [asyncio.create_task(stream_client(stream_http)) for _ in range(4)]
            watcher = asyncio.create_task(watch_channels())
            try:
                async with asyncio.timeout(240):
                    await asyncio.gather(*(typist_client() for _ in range(16)))
            finally:
                typing_done.set()
                await asyncio.gather(*streams, watcher)
        elapsed = time.monotonic() - started
        after = await asyncio.to_thread(node.channels_of, "sender-")
    low, high = min(seen, default=before), max(seen, default=before)
    print(
        f"\n2,000 made-up model names in {elapsed:.1f} s; sender channels: {before} before, {after} "
        f"after, {low}-{high} while they ran ({len(seen)} samples); statuses {statuses}; "
        f"the other user's streams: {outcomes}"
    )
    assert statuses == {404: 2000}, statuses
    # The sender keeps two channels (publishing, replies) and one for passive declares, which the
    # broker closes at every unknown name and the sender opens again for the next read: the count
    # moves by one or two around that, where each made-up name used to leave one channel open.
    assert after <= before + 1, (before, after)
    assert high <= before + 2, seen
    assert set(outcomes) == {"ok"} and outcomes["ok"] >= 4, outcomes


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (with at least ``labels``) in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        sample = line.startswith(name + "{") or line.startswith(name + " ")
        if sample and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(maxsplit=1)[-1])
    return total


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(url + "/metrics")).text


async def test_a_whole_answer_larger_than_a_broker_message_arrives_whole(
    limit_stack: LimitStack, tokens: Tokens
) -> None:
    """A non-streamed answer of about 2.5 MiB through a broker that takes at most 1 MiB a message:
    split by the consumer, joined by the sender, byte for byte what the backend said."""
    token = await tokens.create("whole-reader")
    await wait_listed(limit_stack.sender, token, limit_stack.model, timeout=30)
    max_tokens = 2_500_000 // WORD
    body = {"model": limit_stack.model, "prompt": "a long one", "max_tokens": max_tokens}
    async with httpx.AsyncClient(timeout=60) as http:
        through = await http.post(limit_stack.sender.url + "/v1/completions", json=body, headers=auth(token))
        direct = await http.post(limit_stack.backend.url + "/v1/completions", json=body)
    assert through.status_code == 200, through.text[:300]
    assert len(through.content) > 2 * MAX_MESSAGE
    answer, expected = through.json(), direct.json()
    assert answer["choices"][0]["text"] == expected["choices"][0]["text"]
    assert answer["usage"]["completion_tokens"] == max_tokens
    print(f"\nwhole answer of {len(through.content)} bytes through a broker taking {MAX_MESSAGE} a message")

    # Larger than the sender holds for one request: refused with a clear error, generation stopped.
    too_large = {**body, "max_tokens": 2 * BUFFER_BOUND // WORD}
    async with httpx.AsyncClient(timeout=60) as http:
        refused = await http.post(
            limit_stack.sender.url + "/v1/completions", json=too_large, headers=auth(token)
        )
    assert refused.status_code == 502, refused.text[:300]
    assert refused.json()["error"]["code"] == "answer_too_large"


async def test_a_client_that_stops_reading_costs_a_bounded_buffer(
    limit_stack: LimitStack, tokens: Tokens
) -> None:
    """A streamed generation far larger than the sender's bound, to a client that reads the first
    bytes and then nothing: the sender holds at most the bound, stops the request, the consumer
    cancels the generation, and the client, once it reads again, finds an error event at the end."""
    token = await tokens.create("stalled-reader")
    sender = limit_stack.sender
    await wait_listed(sender, token, limit_stack.paced_model, timeout=30)
    metrics_before = await scrape(limit_stack.paced_consumer.url)
    cancelled_before = metric(metrics_before, "consumer_requests_total", outcome="cancelled")
    stopped_before = metric(await scrape(sender.metrics_url), "dispatcher_stopped_answers_total")
    body = orjson.dumps(
        {"model": limit_stack.paced_model, "prompt": "go on", "max_tokens": STREAM_TOKENS, "stream": True}
    )
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the stall shows soon
    client.settimeout(30)
    try:
        await asyncio.to_thread(client.connect, sender.address)
        await asyncio.to_thread(client.sendall, request)
        head = await asyncio.to_thread(client.recv, 4096)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        # Now the client reads nothing; watch the sender's buffer until it gives up on the request.
        samples: list[float] = []
        async with asyncio.timeout(90):
            while True:
                text = await scrape(sender.metrics_url)
                samples.append(metric(text, "dispatcher_buffered_reply_bytes"))
                if metric(text, "dispatcher_stopped_answers_total") > stopped_before:
                    break
                await asyncio.sleep(0.2)
        async with asyncio.timeout(30):
            while True:
                consumer_text = await scrape(limit_stack.paced_consumer.url)
                if metric(consumer_text, "consumer_requests_total", outcome="cancelled") > cancelled_before:
                    break
                await asyncio.sleep(0.2)
        backend_text = await scrape(limit_stack.paced_backend.url)
        # The client reads on: what the kernel buffered, then the error event, then the end.
        received = bytearray(head)
        async with asyncio.timeout(60):
            while not received.endswith(b"0\r\n\r\n"):
                data = await asyncio.to_thread(client.recv, 1 << 20)
                if not data:
                    break
                received += data
    finally:
        client.close()
    print(
        f"\nstalled client: sender buffer peaked at {max(samples):.0f} bytes (bound {BUFFER_BOUND}); "
        f"the client got {len(received)} bytes of a {STREAM_TOKENS}-token generation; "
        f"aborted tokens at the backend {metric(backend_text, 'simulator:generation_tokens_aborted_total')}"
    )
    assert max(samples) <= BUFFER_BOUND, samples
    assert max(samples) > BUFFER_BOUND / 2, samples  # it did fill up: the client really stalled
    assert metric(backend_text, "simulator:generation_tokens_aborted_total") > 0
    assert b"client_too_slow" in received and b"[DONE]" not in received
    assert len(received) < STREAM_TOKENS * 200 / 4  # far less than the generation (~200 bytes a token)
    log = sender.log_path.read_text()
    stopped = [line for line in log.splitlines() if "SENDER_MAX_BUFFERED_REPLY_BYTES" in line]
    assert stopped and not any("lorem" in line or token in line for line in stopped), stopped


async def test_a_reply_nobody_can_receive_stops_the_generation(limit_stack: LimitStack) -> None:
    """A request whose reply queue does not exist (its sender is gone for good): the consumer's first
    piece comes back unroutable, it counts it and stops the generation at once."""
    model, consumer = limit_stack.model, limit_stack.consumer
    before = await scrape(consumer.url)
    aborted_before = metric(
        await scrape(limit_stack.backend.url), "simulator:generation_tokens_aborted_total"
    )
    request = contract.Request(
        path="/v1/completions",
        body=orjson.dumps({"model": model, "prompt": "x", "max_tokens": STREAM_TOKENS, "stream": True}),
        stream=True,
        priority=1,
        deadline=time.time() + 60,
        request_id="orphan",
        correlation_id=uuid.uuid4().hex,
        reply_to=f"dispatch.reply.gone-{uuid.uuid4().hex[:8]}",
    )
    connection = await aio_pika.connect(limit_stack.node.url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(request.message(), routing_key=contract.model_queue(model))
    async with asyncio.timeout(30):
        while True:
            text = await scrape(consumer.url)
            lost = metric(text, "consumer_lost_replies_total", reason="no_reply_queue")
            stopped = metric(text, "consumer_requests_total", outcome="reply lost")
            if lost > metric(before, "consumer_lost_replies_total", reason="no_reply_queue") and stopped > (
                metric(before, "consumer_requests_total", outcome="reply lost")
            ):
                break
            await asyncio.sleep(0.2)
    backend_text = await scrape(limit_stack.backend.url)
    aborted = metric(backend_text, "simulator:generation_tokens_aborted_total") - aborted_before
    print(f"\nreply queue gone: lost {lost}, stopped {stopped}, {aborted:.0f} tokens made before the stop")
    assert 0 < aborted < STREAM_TOKENS
