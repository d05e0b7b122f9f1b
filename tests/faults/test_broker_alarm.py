"""A memory alarm on the broker: publishers are blocked, consuming connections are not, nothing hangs.

RabbitMQ blocks every connection that publishes while an alarm is on, and a
blocked connection carries nothing else either. With publishing and consuming
on separate connections (both services), only the publishing ones block: the
consumers' deliveries and acks, and the senders' replies and queue reads, keep
their connection. A consumer's replies are published with confirms, and a
request is acked only once its whole answer is confirmed (an ack before would
lose the request if the answer were lost): so the requests it holds wait for the
alarm to clear, and are then answered; the sender answers new requests with a
clear 503 within bounds. The alarm is raised on a private node by lowering
``vm_memory_high_watermark`` below what the node uses.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import contract
from harness.api import auth, wait_listed
from harness.broker_node import BrokerNode
from harness.processes import Processes
from harness.testrun import unique

pytestmark = pytest.mark.timeout(150, func_only=True)
"""Node start-up is the fixture's; the test body alone gets this long."""


def held_and_queued(node: BrokerNode, queue: str) -> bool:
    ready, unacked = node.queue_counts().get(queue, (0, 0))
    return unacked == 2 and ready >= 2


def connection_states(node: BrokerNode) -> list[str]:
    return node.ctl("list_connections", "-q", "state").split()


def consuming_connections_blocked(node: BrokerNode) -> list[str]:
    """The consuming connections (``...-consume``) the broker blocked: none may be. (``blocking``, the
    state of every connection while an alarm is on, only means that its next publish would block.)"""
    output = node.ctl("list_connections", "-q", "--no-table-headers", "client_properties", "state")
    consuming = [line for line in output.splitlines() if "-consume" in line]
    assert len(consuming) >= 2, output  # the sender's and the consumer's
    return [line for line in consuming if line.endswith("\tblocked")]


async def until(condition: str, check: object, timeout: float = 30) -> None:
    assert callable(check)
    give_up = time.monotonic() + timeout  # each check runs rabbitmqctl, itself about a second
    while time.monotonic() < give_up:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not reached within {timeout} s: {condition}")


async def test_memory_alarm_blocks_publishers_not_consumers(
    processes: Processes, broker_node: BrokerNode, token: str
) -> None:
    model = unique("alarm")
    backend = processes.simulator(model, max_num_seqs=2, itl_ms=20)
    processes.consumer(model, backend, rabbitmq_url=broker_node.url, max_inflight=2, flow="fixed")
    sender = processes.sender("postgres", rabbitmq_url=broker_node.url)
    await wait_listed(sender, token, model, timeout=30)
    queue = contract.model_queue(model)
    body = {"model": model, "prompt": "alarm", "max_tokens": 200}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=120) as http:
        first = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(6)]
        await until("2 requests served, more queued", lambda: held_and_queued(broker_node, queue))
        await asyncio.to_thread(broker_node.ctl, "set_vm_memory_high_watermark", "0.0001")
        try:
            await until("the alarm blocks a publisher", lambda: "blocked" in connection_states(broker_node))
            # Only publishing connections block: the consuming ones keep running (deliveries, acks).
            assert consuming_connections_blocked(broker_node) == []
            # New requests: a clear 503 within bounds (a publish stays unconfirmed), not a hang.
            during = await asyncio.wait_for(
                asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(2)]), 60
            )
        finally:
            await asyncio.to_thread(broker_node.ctl, "set_vm_memory_high_watermark", "0.4")
        # The alarm cleared: the replies held back reach their clients, and new requests are served.
        answers = await asyncio.wait_for(asyncio.gather(*first), 60)
        after = await http.post("/v1/completions", json=body)
        await until("the queue drained", lambda: broker_node.queue_counts().get(queue) == (0, 0))
    for answer in during:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] in ("queue_unavailable", "broker_unavailable")
        assert answer.headers["retry-after"]
    assert [answer.status_code for answer in answers] == [200] * 6, [answer.text for answer in answers]
    assert after.status_code == 200, after.text
