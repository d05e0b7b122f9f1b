"""Nothing hangs: deadlines end in 504, malformed queue messages are rejected without harm."""

from __future__ import annotations

import asyncio
import signal

import aio_pika
import httpx
import orjson

import contract
from harness.api import auth, wait_listed
from harness.observe import queue_depth, wait_depth, wait_running
from harness.processes import Processes
from harness.stack import Service, wait_http
from harness.testrun import DEAD_LETTER_QUEUE, RABBITMQ_URL, Tokens, unique
from sender.broker import Broker


async def aborted_requests(backend: Service) -> float:
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(backend.url + "/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("simulator:requests_aborted_total")
    )


async def test_deadline_ends_running_and_queued_requests_with_504(processes: Processes, token: str) -> None:
    sender = processes.sender("postgres", deadline_seconds=1.0)
    model = unique("deadline")
    backend, _ = processes.one_slot(model)
    await wait_listed(sender, token, model)
    long = {"model": model, "prompt": "x", "max_tokens": 400}  # 2 s of generation, past the 1 s deadline
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        running = asyncio.create_task(http.post("/v1/completions", json=long))
        await wait_running(backend)
        queued = await http.post(
            "/v1/completions", json=long
        )  # long too: it cannot slip in before its deadline
        answered = await running
    for response in (answered, queued):
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "deadline_exceeded"
    # The running generation was stopped rather than left to burn the GPU, and nothing stays queued.
    for _ in range(50):
        if await aborted_requests(backend) >= 1 and await queue_depth(model) == 0:
            break
        await asyncio.sleep(0.1)
    assert await aborted_requests(backend) >= 1
    assert await queue_depth(model) == 0


async def test_malformed_message_is_rejected_and_the_consumer_keeps_serving(
    processes: Processes, sender: Service, token: str
) -> None:
    model = unique("malformed")
    backend = processes.simulator(model)
    consumer = processes.consumer(model, backend)
    await wait_listed(sender, token, model)
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        for message in (
            aio_pika.Message(b"not even json"),
            aio_pika.Message(b"{}", headers={"v": 99, "path": "/v1/completions", "deadline": 1}),
            # Well-formed headers, but no reply_to: nobody could receive the answer.
            aio_pika.Message(b"{}", headers={"v": 1, "path": "/v1/completions", "deadline": 10**13}),
        ):
            await channel.default_exchange.publish(message, routing_key=contract.model_queue(model))
    for _ in range(50):
        if await queue_depth(model) == 0:
            break
        await asyncio.sleep(0.1)
    assert await queue_depth(model) == 0
    assert consumer.alive()
    # Kept for inspection in the dead-letter queue, each with the reason it was refused.
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)
        kept = []
        while (dead_message := await dead.get(no_ack=True, fail=False)) is not None:
            kept.append(dead_message)
    assert [m.body for m in kept] == [b"not even json", b"{}", b"{}"]
    assert all(m.headers[contract.H_REJECTED] for m in kept)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http:
        response = await http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
    assert response.status_code == 200


async def simulator_counter(backend: Service, name: str) -> float:
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(backend.url + "/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name))


async def wait_counter(backend: Service, name: str, at_least: float, timeout: float = 5) -> float:
    for _ in range(int(timeout / 0.05)):
        value = await simulator_counter(backend, name)
        if value >= at_least:
            return value
        await asyncio.sleep(0.05)
    return await simulator_counter(backend, name)


async def test_client_that_leaves_cancels_the_generation(
    processes: Processes, sender: Service, token: str
) -> None:
    model = unique("leaves")
    backend = processes.simulator(model, max_num_seqs=4, ttft_ms=5, itl_ms=5)
    processes.consumer(model, backend)
    await wait_listed(sender, token, model)
    long = {"model": model, "prompt": "x", "max_tokens": 400}  # 2 s if nobody stops it
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        whole = asyncio.create_task(http.post("/v1/completions", json=long))
        await wait_running(backend)
        await asyncio.sleep(0.2)
        whole.cancel()
        assert await wait_counter(backend, "simulator:requests_aborted_total", 1) == 1

        async with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as response:
            assert response.status_code == 200
            async for _ in response.aiter_bytes():
                break  # read the first piece, then hang up
        assert await wait_counter(backend, "simulator:requests_aborted_total", 2) == 2
    wasted = await simulator_counter(backend, "simulator:generation_tokens_aborted_total")
    assert wasted < 2 * 200, f"{wasted} tokens generated for clients that had gone"


async def test_queued_request_of_a_gone_client_is_skipped(
    processes: Processes, sender: Service, token: str
) -> None:
    model = unique("skipped")
    backend, _ = processes.one_slot(model)
    await wait_listed(sender, token, model)
    request = {"model": model, "prompt": "x", "max_tokens": 100}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        blocker = asyncio.create_task(http.post("/v1/completions", json=request))
        await wait_running(backend)
        queued = asyncio.create_task(http.post("/v1/completions", json=request))
        for _ in range(100):
            if await queue_depth(model) == 1:
                break
            await asyncio.sleep(0.02)
        queued.cancel()
        assert (await blocker).status_code == 200
    await asyncio.sleep(0.5)
    assert await queue_depth(model) == 0
    assert await simulator_counter(backend, "vllm:request_success_total") == 1
    assert await simulator_counter(backend, "simulator:requests_aborted_total") == 0


async def test_killed_consumer_request_is_served_by_another(
    processes: Processes, sender: Service, token: str
) -> None:
    model = unique("crash")
    first_backend, first = processes.one_slot(model, name=f"consumer-{model}-a")
    await wait_listed(sender, token, model)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        request = asyncio.create_task(
            http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 200})
        )
        await wait_running(first_backend)
        second_backend = processes.simulator(model, name=f"simulator-{model}-b")
        processes.consumer(model, second_backend, name=f"consumer-{model}-b")
        first.kill()  # SIGKILL before any answer: the broker hands the request to the other consumer
        response = await request
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 200


async def test_sigterm_drains_the_requests_in_flight(
    processes: Processes, sender: Service, token: str
) -> None:
    model = unique("drain")
    backend, consumer = processes.one_slot(model)
    await wait_listed(sender, token, model)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        running = asyncio.create_task(
            http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 100})
        )
        await wait_running(backend)
        queued = asyncio.create_task(
            http.post("/v1/completions", json={"model": model, "prompt": "y", "max_tokens": 2})
        )
        await asyncio.sleep(0.1)
        consumer.process.terminate()  # what Kubernetes sends
        assert (await running).status_code == 200  # finished, not cut short
        await asyncio.to_thread(consumer.process.wait, 10)
        assert await queue_depth(model) == 1  # the waiting request stays for another consumer
        processes.consumer(model, backend, name=f"consumer-{model}-next")
        assert (await queued).status_code == 200


async def test_consumer_killed_mid_stream_ends_the_answer_with_an_error_at_once(
    processes: Processes, sender: Service, token: str
) -> None:
    """The sender notices the dead consumer (its liveness queue is gone), not the deadline;
    the copy the broker hands to another consumer is not relayed (no duplicate text) and is stopped."""
    model = unique("mid-stream")
    _, first = processes.one_slot(model, name=f"consumer-{model}-a")
    await wait_listed(sender, token, model)
    second_backend = processes.simulator(model, name=f"simulator-{model}-b", ttft_ms=5, itl_ms=5)
    body = {"model": model, "prompt": "x", "max_tokens": 2000, "stream": True}  # 10 s if nobody stops it
    # The deadline is far; the client's own timeout only turns a hang into a failure.
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
        async with asyncio.timeout(30):
            async with http.stream(
                "POST", "/v1/completions", json=body, headers={"X-Request-Timeout": "120"}
            ) as response:
                assert response.status_code == 200
                received = b""
                async for chunk in response.aiter_bytes():
                    received += chunk
                    if first.alive() and received.count(b"\n\n") >= 5:
                        second = processes.consumer(model, second_backend, name=f"consumer-{model}-b")
                        await asyncio.to_thread(wait_http, second, "/health")
                        # A stream the live consumer serves meanwhile: checking its liveness queue
                        # (exclusive, so RESOURCE_LOCKED to anyone else) must not hide the dead one.
                        other = asyncio.create_task(read_stream(http, {**body, "max_tokens": 400}))
                        await wait_running(second_backend)
                        first.kill()
            other_answer = await other
    assert other_answer.endswith(b"data: [DONE]\n\n")  # the live consumer's stream was not disturbed
    events = [e.removeprefix(b"data: ") for e in received.split(b"\n\n") if e.strip()]
    assert b"[DONE]" not in events
    error = orjson.loads(events[-1])["error"]
    assert error["code"] == "stream_interrupted"
    texts = [orjson.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert 5 <= len(texts) < 2000
    # The redelivered copy started on the second consumer, and was stopped rather than served to nobody.
    assert await wait_counter(second_backend, "simulator:requests_aborted_total", 1, timeout=20) == 1


async def read_stream(http: httpx.AsyncClient, body: dict[str, object]) -> bytes:
    async with http.stream("POST", "/v1/completions", json=body) as response:
        return await response.aread()


async def test_request_timeout_header_and_token_shorten_the_deadline(
    processes: Processes, sender: Service, token: str, tokens: Tokens
) -> None:
    model = unique("timeout-header")
    backend, _ = processes.one_slot(model)
    await wait_listed(sender, token, model)
    long = {"model": model, "prompt": "x", "max_tokens": 2000}  # 10 s of generation
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
        short = await http.post("/v1/completions", json=long, headers={"X-Request-Timeout": "0.5"})
        assert short.status_code == 504, short.text
        assert short.json()["error"]["code"] == "deadline_exceeded"
        for bad in ("soon", "0", "-1", "nan", "inf"):
            refused = await http.post("/v1/completions", json=long, headers={"X-Request-Timeout": bad})
            assert refused.status_code == 400, bad
            assert refused.json()["error"]["code"] == "invalid_request_timeout"
        quick = {"model": model, "prompt": "x", "max_tokens": 2}
        fine = await http.post("/v1/completions", json=quick, headers={"X-Request-Timeout": "1e9"})
        assert fine.status_code == 200  # longer than the server's deadline: capped, not refused
        batch = auth(await tokens.create("batch-deadline", max_seconds=0.5))
        cut = await http.post("/v1/completions", json=long, headers=batch)
        assert cut.status_code == 504, cut.text
        assert cut.json()["error"]["code"] == "deadline_exceeded"
        raised = await http.post("/v1/completions", json=long, headers={**batch, "X-Request-Timeout": "60"})
        assert raised.status_code == 504  # a request cannot raise its token's ceiling
        assert (await http.post("/v1/completions", json=quick, headers=batch)).status_code == 200
    assert await wait_counter(backend, "simulator:requests_aborted_total", 3) == 3


async def test_global_cap_on_waiting_requests(processes: Processes, token: str) -> None:
    sender = processes.sender("postgres", max_queued_per_model=2)
    model = unique("capped")
    backend, _ = processes.one_slot(model)
    await wait_listed(sender, token, model)
    request = {"model": model, "prompt": "x", "max_tokens": 100}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        blocker = asyncio.create_task(http.post("/v1/completions", json=request))
        await wait_running(backend)
        queued = []
        for depth in (1, 2):
            queued.append(asyncio.create_task(http.post("/v1/completions", json=request)))
            await wait_depth(model, depth)
            await asyncio.sleep(0.2)  # the sender's depth is a cached read: let it catch up
        refused = await http.post("/v1/completions", json=request)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["retry-after"]) >= 1
        for response in await asyncio.gather(blocker, *queued):
            assert response.status_code == 200, response.text


async def test_hung_backend_ends_in_504_and_the_consumer_pauses_until_it_is_back(
    processes: Processes, sender: Service, token: str
) -> None:
    model = unique("hung")
    backend = processes.simulator(model)
    processes.consumer(model, backend, health_interval=0.2, health_timeout=0.3)
    await wait_listed(sender, token, model)
    request = {"model": model, "prompt": "x", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        backend.process.send_signal(signal.SIGSTOP)  # alive but answering nothing, like a wedged GPU
        try:
            stuck = await http.post("/v1/completions", json=request, headers={"X-Request-Timeout": "1"})
            assert stuck.status_code == 504
            assert stuck.json()["error"]["code"] == "deadline_exceeded"
            await wait_listed(sender, token, model, listed=False)  # health checks time out: paused
        finally:
            backend.process.send_signal(signal.SIGCONT)
        await wait_listed(sender, token, model)
        assert (await http.post("/v1/completions", json=request)).status_code == 200


async def test_a_slow_health_answer_pauses_only_when_it_stays_slow(
    processes: Processes, sender: Service, token: str
) -> None:
    """vLLM's API server can answer /health late while busy: a slow answer alone is not a dead backend."""
    states = {}
    for slow_checks in (1000, 3):
        model = unique(f"busy-health-{slow_checks}")
        backend = processes.simulator(model, health_delay_ms=300, max_num_seqs=1, ttft_ms=5, itl_ms=5)
        consumer = processes.consumer(
            model, backend, health_interval=0.1, health_timeout=0.05, health_slow_checks=slow_checks
        )
        await wait_listed(sender, token, model)
        long = {"model": model, "prompt": "x", "max_tokens": 600}  # 3 s of generation, /health slow meanwhile
        async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
            answer = asyncio.create_task(http.post("/v1/completions", json=long))
            await wait_running(backend)
            await asyncio.sleep(1.5)  # a dozen slow health answers
            states[slow_checks] = (await http.get(consumer.url + "/health")).status_code
            assert (await answer).status_code == 200
    assert states == {1000: 200, 3: 503}  # still consuming / paused after three slow answers in a row


async def test_liveness_tells_a_live_consumer_from_a_gone_one() -> None:
    """A live consumer's liveness queue is exclusive, so a passive declare from the sender is
    refused (RESOURCE_LOCKED) rather than answered: that still means alive."""
    holder = await aio_pika.connect(RABBITMQ_URL)
    broker = Broker([RABBITMQ_URL])

    async def ignore(_: object) -> None:
        pass

    try:
        channel = await holder.channel()
        live = await channel.declare_queue(exclusive=True, auto_delete=True)
        await broker.connect(on_reply=ignore, on_announcement=lambda _: None)
        gone = unique("amq-gone-liveness")
        assert await broker.vanished({live.name, gone}) == [gone]
        assert await broker.vanished({live.name}) == []
    finally:
        await broker.close()
        await holder.close()


async def until_refused(service: Service, timeout: float = 5) -> None:
    host, port = service.address
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except ConnectionRefusedError:
            return
        writer.close()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{service.name} still accepts connections")


async def stream_across_sender_shutdown(
    processes: Processes, token: str, *, grace: int, max_tokens: int
) -> tuple[bytes, float]:
    """Start a stream, SIGTERM its sender after the first piece, read to the end; the answer, and
    the seconds from the signal to the end of the answer."""
    model = unique(f"drain-{grace}")
    backend = processes.simulator(model, ttft_ms=5, itl_ms=50)
    processes.consumer(model, backend)
    sender = processes.sender("postgres", shutdown_grace=grace)
    await wait_listed(sender, token, model)
    body = {"model": model, "prompt": "x", "max_tokens": max_tokens, "stream": True}
    async with (
        httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        pieces = response.aiter_bytes()
        answer = await anext(pieces)
        sender.process.send_signal(signal.SIGTERM)
        signalled = asyncio.get_running_loop().time()
        await until_refused(sender)  # no new connection once draining
        async for piece in pieces:
            answer += piece
        took = asyncio.get_running_loop().time() - signalled
    await asyncio.to_thread(sender.process.wait, 15)
    return answer, took


async def test_a_stopping_sender_lets_streams_in_flight_finish(processes: Processes, token: str) -> None:
    answer, took = await stream_across_sender_shutdown(processes, token, grace=20, max_tokens=40)
    assert answer.endswith(b"data: [DONE]\n\n") and b'"error"' not in answer
    assert took > 1.0  # the ~2 s stream went on after the signal


async def test_a_stream_outlasting_the_shutdown_grace_ends_with_an_error_event(
    processes: Processes, token: str
) -> None:
    answer, took = await stream_across_sender_shutdown(processes, token, grace=1, max_tokens=200)
    assert took < 5, took  # the 10 s stream was cut at the grace, not served to its end
    last = answer.strip().split(b"\n\n")[-1]
    assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "shutting_down"
