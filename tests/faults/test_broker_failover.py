"""``RABBITMQ_URL`` listing two nodes: when the node in use goes away, both services move to the other.

Two private nodes that are not clustered (each has its own queues), so the
test also shows what the services redeclare on the node they move to: the
model queue, the reply queue, the control exchange. In a real cluster the
queues are shared; moving is the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import contract
from harness.api import auth, wait_listed
from harness.broker_node import BrokerNode
from harness.processes import Processes
from harness.testrun import unique

pytestmark = pytest.mark.timeout(120, func_only=True)
"""Node start-up is the fixture's; the test body alone gets this long."""


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[BrokerNode, BrokerNode]]:
    nodes = (BrokerNode(), BrokerNode())
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(BrokerNode.start, nodes))
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def test_services_move_to_the_next_node(
    processes: Processes, two_nodes: tuple[BrokerNode, BrokerNode], token: str
) -> None:
    first, second = two_nodes
    urls = f"{first.url},{second.url}"
    model = unique("failover")
    backend = processes.simulator(model, max_num_seqs=4)
    processes.consumer(model, backend, rabbitmq_url=urls, flow="fixed", max_inflight=4)
    sender = processes.sender("postgres", rabbitmq_url=urls)
    await wait_listed(sender, token, model, timeout=30)
    body = {"model": model, "prompt": "failover", "max_tokens": 10}
    queue = contract.model_queue(model)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        assert queue in first.queue_counts() and queue not in second.queue_counts()
        await asyncio.to_thread(first.ctl, "stop_app")  # left stopped: the fixture stops the node
        # Sent at once: held while both services reconnect to the second node, then served.
        answers = await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(4)])
    assert [answer.status_code for answer in answers] == [200] * 4, [a.text for a in answers]
    assert queue in second.queue_counts()
