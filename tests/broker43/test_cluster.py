"""A 3-node RabbitMQ 4.3 cluster: it forms, and a quorum queue outlives its leader.

NOTES.md measured it: a new leader is elected in about a second and every
queued message is delivered from the survivors, in priority order.
"""

from __future__ import annotations

import time
import uuid

import aio_pika
import pytest

from harness import rabbitmq43
from tests.broker43.queues import QUORUM, drain, expected_order, publish

pytestmark = pytest.mark.timeout(90, func_only=True)


def leader_of(node: rabbitmq43.Node43, queue: str) -> str:
    rows = {row[0]: row[1] for row in node.list_queues("name", "leader")}
    return rows[queue]


def test_cluster_forms(cluster43: list[rabbitmq43.Node43]) -> None:
    names = sorted(node.name for node in cluster43)
    assert cluster43[0].running_nodes() == names
    assert cluster43[-1].running_nodes() == names


async def test_quorum_queue_survives_its_leader_stopping(cluster43: list[rabbitmq43.Node43]) -> None:
    queue = f"qq-failover-{uuid.uuid4().hex[:8]}"
    messages: list[tuple[int | None, str]] = [
        (priority, f"p{priority}-{index}") for index, priority in enumerate([1, 5, 9] * 10)
    ]
    first = cluster43[0]
    connection = await aio_pika.connect(first.url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        await publish(channel, queue, messages)
    leader = next(node for node in cluster43 if node.name == leader_of(first, queue))
    survivors = [node for node in cluster43 if node is not leader]
    leader.stop()
    try:
        stopped = time.monotonic()
        connection = await aio_pika.connect(survivors[0].url)
        async with connection:
            channel = await connection.channel()
            got = await drain(channel, queue, len(messages))
            print(
                f"\nleader {leader.name} stopped; {len(got)} messages from the survivors in "
                f"{time.monotonic() - stopped:.1f} s"
            )
            assert got == expected_order(messages)
            assert leader_of(survivors[0], queue) in {node.name for node in survivors}
            await channel.queue_delete(queue)
    finally:
        leader.start()  # the session's cluster stays whole for whoever uses it next
    leader.wait_cluster([node.name for node in cluster43])
