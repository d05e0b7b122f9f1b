"""Queues that live exactly as long as one connection: liveness, and listening to the control exchange.

Each consumer connection declares a server-named exclusive queue; it exists
exactly as long as that connection. Every reply piece names it
(:attr:`contract.Reply.liveness_queue`), and a sender that waits for the rest
of an answer checks that the queue still exists.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiormq
import aiormq.abc


async def declare(channel: aiormq.abc.AbstractChannel) -> str:
    """Declare a new liveness queue on ``channel``'s connection and return its name."""
    declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
    assert declared is not None and declared.queue is not None
    return declared.queue


QUEUE_CHECK_TIMEOUT = 1.0
"""Seconds one liveness queue may take to answer before it counts as unreachable this round."""


async def vanished(
    connection: aiormq.abc.AbstractConnection, queues: set[str], unreachable: list[str] | None = None
) -> list[str]:
    """Which of these liveness queues no longer exist (their consumer connection is gone).

    Checked on a plain channel of its own, opened for the round: the broker
    closes a channel on every missing queue. A queue whose node was killed does
    not answer at all (the cluster waits for that node): it is put in
    ``unreachable``, and the caller decides how long that may last.
    """
    gone = []
    channel = None
    try:
        for queue in queues:
            if channel is None or channel.is_closed:
                channel = await connection.channel()
            check = asyncio.ensure_future(channel.queue_declare(queue, passive=True))
            done, _ = await asyncio.wait({check}, timeout=QUEUE_CHECK_TIMEOUT)
            if not done:
                # Not cancelled (aiormq would close the channel under the call, and a late frame on a
                # reused channel number closes the whole connection): left to finish on its channel.
                if unreachable is not None:
                    unreachable.append(queue)
                check.add_done_callback(_close_after(channel))
                channel = None
                continue
            try:
                check.result()
            except aiormq.exceptions.ChannelNotFoundEntity:
                gone.append(queue)
            except aiormq.exceptions.ChannelLockedResource:
                pass  # RESOURCE_LOCKED: the queue exists, held by its consumer's live connection
    finally:
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
    return gone


async def listen(
    channel: aiormq.abc.AbstractChannel,
    exchange: str,
    keys: tuple[str, ...],
    callback: aiormq.abc.ConsumerCallback,
) -> str:
    """Subscribe ``callback`` (no acks) to ``keys`` of ``exchange`` through a new server-named
    exclusive queue of this connection; return its name.

    Made again after each reconnect, outside aio-pika's robust bookkeeping: a
    robust queue is redeclared under its old name, and when its node was killed
    the cluster still holds that name for the dead connection (RESOURCE_LOCKED),
    which kept the whole reconnect failing until the node was back.
    """
    declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
    assert declared is not None and declared.queue is not None
    for key in keys:
        await channel.queue_bind(declared.queue, exchange, routing_key=key)
    await channel.basic_consume(declared.queue, callback, no_ack=True)
    return declared.queue


_closing: set[asyncio.Future[None]] = set()
"""Channel closes under way, kept referenced until they finish."""


def _close_after(channel: aiormq.abc.AbstractChannel) -> Callable[[asyncio.Future[Any]], None]:
    """Close ``channel`` once its late check has an answer (and consume that answer)."""

    def done(check: asyncio.Future[Any]) -> None:
        if not check.cancelled():
            check.exception()
        if not channel.is_closed:
            closing = asyncio.ensure_future(channel.close())
            _closing.add(closing)
            closing.add_done_callback(_closing.discard)

    return done
