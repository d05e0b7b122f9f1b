"""What the product will rely on from RabbitMQ 4.3, measured on a real 4.3 node (see NOTES.md).

Quorum queues deliver in strict priority order (levels 0-31, FIFO within a
level) and are declared without ``x-max-priority``, which 4.3 refuses on them.
"""

from __future__ import annotations

import uuid

import aio_pika
import aio_pika.exceptions
import pytest

from harness import rabbitmq43
from tests.broker43.queues import QUORUM, drain, expected_order, publish

# The first session on a machine installs 4.3 in the fixture (bounded by its own timeouts).
pytestmark = pytest.mark.timeout(60, func_only=True)


async def test_node_reports_version_4_3(node43: rabbitmq43.Node43) -> None:
    assert node43.ctl("version").strip().startswith(f"{rabbitmq43.SERIES}.")
    connection = await aio_pika.connect(node43.url)
    async with connection:
        properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
        assert str(properties["version"]).startswith(f"{rabbitmq43.SERIES}.")


def test_deprecated_features_as_4_3_ships_them(node43: rabbitmq43.Node43) -> None:
    """``global_qos`` is denied by default (applied per consumer, with a log line); mirroring is gone."""
    states = node43.list_deprecated_features()
    assert states["global_qos"] == "denied"
    assert states["classic_queue_mirroring"] == "denied"
    assert states["transient_nonexcl_queues"] == "permitted"


async def test_quorum_queue_strict_priority_without_x_max_priority(node43: rabbitmq43.Node43) -> None:
    """Priorities 1, 5, 9 come out as 9, 5, 1, FIFO within each; none is 0, above 31 is 31."""
    queue = f"qq-priority-{uuid.uuid4().hex[:8]}"
    messages: list[tuple[int | None, str]] = [
        (priority, f"p{priority}-{index}") for index, priority in enumerate([1, 5, 9] * 4)
    ]
    messages += [(None, "none-a"), (0, "zero-b"), (31, "p31-c"), (40, "p40-d"), (None, "none-e")]
    connection = await aio_pika.connect(node43.url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        assert node43.list_queues("name", "type") == [[queue, "quorum"]]
        await publish(channel, queue, messages)
        got = await drain(channel, queue, len(messages))
        await channel.queue_delete(queue)
    assert got == expected_order(messages)
    assert got[:6] == ["p31-c", "p40-d", "p9-2", "p9-5", "p9-8", "p9-11"]
    assert got[-3:] == ["none-a", "zero-b", "none-e"]


async def test_quorum_queue_refuses_x_max_priority(node43: rabbitmq43.Node43) -> None:
    queue = f"qq-max-priority-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(node43.url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed) as refused:
            await channel.declare_queue(queue, durable=True, arguments={**QUORUM, "x-max-priority": 10})
    assert "x-max-priority" in str(refused.value)
    assert queue not in {row[0] for row in node43.list_queues("name")}
