"""A memory alarm on the broker: publishers are blocked, consumers still ack and drain, nothing hangs.

RabbitMQ blocks every connection that publishes while an alarm is on, and a
blocked connection carries nothing else either. With publishing and consuming
on separate connections (both services), the consumers keep taking and acking
what is queued; their replies wait for the alarm to clear; the sender answers
new requests with a clear 503 within bounds. The alarm is raised on a private
node by lowering ``vm_memory_high_watermark`` below what the node uses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

import contract
from harness.api import auth, wait_listed
from harness.broker_node import BrokerNode
from harness.processes import Processes
from harness.testrun import unique

pytestmark = pytest.mark.timeout(150, func_only=True)
"""Node start-up is the fixture's; the test body alone gets this long."""


@pytest.fixture(scope="module")
def alarm_node() -> Iterator[BrokerNode]:
    node = BrokerNode()
    node.start()
    try:
        yield node
    finally:
        node.stop()


def held_and_queued(node: BrokerNode, queue: str) -> bool:
    ready, unacked = node.queue_counts().get(queue, (0, 0))
    return unacked == 2 and ready >= 2


def connection_states(node: BrokerNode) -> list[str]:
    return node.ctl("list_connections", "-q", "state").split()


async def until(condition: str, check: object, timeout: float = 30) -> None:
    assert callable(check)
    give_up = time.monotonic() + timeout  # each check runs rabbitmqctl, itself about a second
    while time.monotonic() < give_up:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not reached within {timeout} s: {condition}")


async def test_memory_alarm_blocks_publishers_not_consumers(
    processes: Processes, alarm_node: BrokerNode, token: str
) -> None:
    model = unique("alarm")
    backend = processes.simulator(model, max_num_seqs=2, itl_ms=20)
    processes.consumer(model, backend, rabbitmq_url=alarm_node.url, max_inflight=2, flow="fixed")
    sender = processes.sender("postgres", rabbitmq_url=alarm_node.url)
    await wait_listed(sender, token, model, timeout=30)
    queue = contract.model_queue(model)
    body = {"model": model, "prompt": "alarm", "max_tokens": 200}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=120) as http:
        first = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(6)]
        await until("2 requests served, more queued", lambda: held_and_queued(alarm_node, queue))
        await asyncio.to_thread(alarm_node.ctl, "set_vm_memory_high_watermark", "0.0001")
        try:
            await until("the alarm blocks a publisher", lambda: "blocked" in connection_states(alarm_node))
            # The consumer keeps taking and acking what is queued: its acks are not on a blocked connection.
            await until(
                "the queue drained", lambda: alarm_node.queue_counts().get(queue) == (0, 0), timeout=60
            )
            # New requests: a clear 503 within bounds (a publish stays unconfirmed), not a hang.
            during = await asyncio.wait_for(
                asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(2)]), 60
            )
        finally:
            await asyncio.to_thread(alarm_node.ctl, "set_vm_memory_high_watermark", "0.4")
        # The alarm cleared: the replies held back reach their clients, and new requests are served.
        answers = await asyncio.wait_for(asyncio.gather(*first), 60)
        after = await http.post("/v1/completions", json=body)
    for answer in during:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] in ("queue_unavailable", "broker_unavailable")
        assert answer.headers["retry-after"]
    assert [answer.status_code for answer in answers] == [200] * 6, [answer.text for answer in answers]
    assert after.status_code == 200, after.text
