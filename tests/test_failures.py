"""Nothing hangs: deadlines end in 504, malformed queue messages are rejected without harm."""

from __future__ import annotations

import asyncio

import aio_pika
import httpx

import contract
from tests.conftest import RABBITMQ_URL, Processes, auth, unique, wait_listed
from tests.test_priority import queue_depth, wait_running
from tools.stack import Service


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
    backend = processes.simulator(model, max_num_seqs=1, ttft_ms=5, itl_ms=5)
    processes.consumer(model, backend, flow="fixed", max_inflight=1)
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
    backend = processes.simulator(model, max_num_seqs=1, ttft_ms=5, itl_ms=5)
    processes.consumer(model, backend, flow="fixed", max_inflight=1)
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
    first_backend = processes.simulator(model, max_num_seqs=1, ttft_ms=5, itl_ms=5)
    first = processes.consumer(model, first_backend, flow="fixed", max_inflight=1, name=f"consumer-{model}-a")
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
    backend = processes.simulator(model, max_num_seqs=1, ttft_ms=5, itl_ms=5)
    consumer = processes.consumer(model, backend, flow="fixed", max_inflight=1)
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
