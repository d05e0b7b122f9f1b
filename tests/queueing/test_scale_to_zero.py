"""A model scaled to zero: with SENDER_QUEUE_WITHOUT_CONSUMERS the request waits in the queue
(whose depth is what KEDA scales on) and is answered once a replica is back."""

from __future__ import annotations

import asyncio

import httpx

from harness.api import auth, wait_listed
from harness.observe import queue_depth
from harness.processes import Processes
from harness.testrun import unique


async def test_request_waits_for_a_replica(processes: Processes, token: str) -> None:
    sender = processes.sender("postgres", queue_without_consumers=True)
    model = unique("scaled-to-zero")
    backend = processes.simulator(model)
    first = processes.consumer(model, backend, name=f"consumer-{model}-first")
    await wait_listed(sender, token, model)
    first.stop()  # scaled to zero: the queue stays, no consumer
    await wait_listed(sender, token, model, listed=False)

    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
        waiting = asyncio.create_task(
            http.post("/v1/completions", json={"model": model, "prompt": "wake up", "max_tokens": 2})
        )
        async with asyncio.timeout(30):
            while await queue_depth(model) == 0:
                assert not waiting.done(), waiting.result().text
                await asyncio.sleep(0.05)
        assert not waiting.done()

        processes.consumer(model, backend, name=f"consumer-{model}-woken")
        async with asyncio.timeout(30):
            response = await waiting
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]
