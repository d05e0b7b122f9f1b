"""Publishing to and draining a queue in the 4.3 tests, and the order a quorum queue must deliver in."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import aio_pika.abc

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


async def publish(
    channel: aio_pika.abc.AbstractChannel, queue: str, messages: list[tuple[int | None, str]]
) -> None:
    """Persistent messages, each confirmed by the broker before the next is sent."""
    for priority, body in messages:
        message = aio_pika.Message(
            body.encode(), priority=priority, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await channel.default_exchange.publish(message, routing_key=queue)


async def drain(
    channel: aio_pika.abc.AbstractChannel, queue: str, count: int, timeout: float = 20.0
) -> list[str]:
    """Bodies of ``count`` messages taken one by one with ``basic.get`` (retried during an election)."""
    got: list[str] = []
    deadline = asyncio.get_running_loop().time() + timeout
    declared = await channel.get_queue(queue, ensure=False)
    while len(got) < count and asyncio.get_running_loop().time() < deadline:
        message = await declared.get(no_ack=False, fail=False, timeout=5)
        if message is None:
            await asyncio.sleep(0.1)
            continue
        got.append(message.body.decode())
        await message.ack()
    return got


def expected_order(messages: list[tuple[int | None, str]]) -> list[str]:
    """Highest level first, FIFO within a level; no priority is level 0, above 31 is level 31."""
    levels = [(min(priority or 0, 31), index) for index, (priority, _) in enumerate(messages)]
    return [messages[index][1] for _, index in sorted(levels, key=lambda item: (-item[0], item[1]))]
