"""Cancellations published before this consumer started: read from the cancellation stream before serving.

Cancellations travel on the control exchange, which reaches only the consumers
connected at that moment. A model woken from zero has none: the requests whose
clients left while it slept would all be served to nobody, first thing, on the
GPU. So every cancellation is also kept in a durable stream
(:data:`contract.CANCEL_STREAM`, bounded by age and size, declared and bound by
the senders). A consumer that starts binds its live control queue first, then
reads the stream from its beginning up to a marker of its own that it appends
there: every cancellation published before the marker was read, every later
one arrives live. Only then does it consume its model queue. A stream, and not
a queue, because each consumer of each model must read every cancellation, and
none may take it away from the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

import contract
from contract import Cancel
from contract.errors import BROKER_GONE
from contract.messages import CANCEL_TYPE, MARKER_TYPE, marker_message

log = logging.getLogger(__name__)

_PREFETCH = 1000
"""Stream messages in flight to this consumer at once while it reads (a stream needs a prefetch)."""


async def catch_up(
    connection: AbstractRobustConnection, on_cancel: Callable[[Cancel], None], *, timeout: float
) -> int | None:
    """Hand every cancellation still in the stream, whose request may still come up, to ``on_cancel``;
    how many, or None if the stream could not be read (missing, refused, or not within ``timeout``)."""
    marker = uuid.uuid4().hex
    done = asyncio.Event()
    found = 0

    async def read(message: AbstractIncomingMessage) -> None:
        nonlocal found
        await message.ack()
        if message.type == MARKER_TYPE:
            if message.body.decode(errors="replace") == marker:
                done.set()
        elif message.type == CANCEL_TYPE:
            cancel = Cancel.from_message(message)
            if cancel.deadline is None or cancel.deadline > time.time():
                found += 1
                on_cancel(cancel)

    channel = await connection.channel(publisher_confirms=False)
    try:
        try:
            queue = await channel.declare_queue(contract.CANCEL_STREAM, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            log.info("no cancellation stream yet (no sender declared it): nothing to catch up on")
            return 0
        await channel.default_exchange.publish(marker_message(marker), routing_key=contract.CANCEL_STREAM)
        await channel.set_qos(prefetch_count=_PREFETCH)
        await queue.consume(read, arguments={"x-stream-offset": "first"})
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            log.warning("cancellation stream not read to its end within %g s; serving anyway", timeout)
            return None
        return found
    except BROKER_GONE as exc:
        log.warning("could not read the cancellation stream: %s", exc)
        return None
    finally:
        with contextlib.suppress(*BROKER_GONE):
            await channel.close()
