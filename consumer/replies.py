"""Writes one request's answer back to the sender, as the contract's numbered pieces, and publishes them.

A streamed answer is batched: the first bytes go out at once (time to first
token matters), later ones at most every ``interval`` seconds or when
``max_bytes`` pile up, so the broker carries a few messages per answer, not
one per token. :class:`ReplyWriter` only numbers and batches (it is tested
without a broker); :class:`ReplyPublisher` puts each piece on the wire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractChannel

from contract import Reply
from contract.errors import BROKER_GONE

Publish = Callable[[Reply], Awaitable[None]]


class ReplyWriter:
    def __init__(self, publish: Publish, *, liveness_queue: str, interval: float, max_bytes: int) -> None:
        self._publish = publish
        self._liveness_queue = liveness_queue
        self._interval = interval
        self._max_bytes = max_bytes
        self._seq = 0
        self._status: int | None = None
        self._content_type: str | None = None
        self._buffer = bytearray()
        self._last_flush = float("-inf")
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self.finished = False
        self.usage: tuple[int, int] | None = None
        """(prompt, completion) tokens as the backend reported them; sent with the last piece."""
        self.queue_ms: int | None = None

    @property
    def status(self) -> int | None:
        """The status sent (or to be sent) to the client."""
        return self._status

    @property
    def started(self) -> bool:
        """Whether anything reached the sender yet (then the request can no longer be retried)."""
        return self._seq > 0

    async def whole(self, status: int, content_type: str | None, body: bytes) -> None:
        """Send a complete, non-streamed answer in one piece."""
        self._status, self._content_type = status, content_type
        self._buffer += body
        await self.finish()

    def begin(self, status: int, content_type: str | None) -> None:
        """Record the status of a streamed answer; it travels with the first bytes."""
        self._status, self._content_type = status, content_type

    async def feed(self, data: bytes) -> None:
        self._buffer += data
        due = self._last_flush + self._interval
        if len(self._buffer) >= self._max_bytes or time.monotonic() >= due:
            await self._flush(last=False)
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_at(due))

    async def finish(self, error: str | None = None) -> None:
        """Send what is left as the last piece; ``error`` marks an answer cut short."""
        if self.finished:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._flush(last=True, error=error)

    def abandon(self) -> None:
        """Send nothing more: the request was given back to the broker or its client is gone.

        A pending batch timer would otherwise still send a piece, which a sender
        waiting for another consumer's copy of the request would take for a gap.
        """
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _flush_at(self, due: float) -> None:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        self._timer = None
        await self._flush(last=False)

    async def _flush(self, *, last: bool, error: str | None = None) -> None:
        async with self._lock:
            if self.finished or (not last and not self._buffer):
                return
            body = bytes(self._buffer)
            self._buffer.clear()
            first = self._seq == 0
            reply = Reply(
                seq=self._seq,
                last=last,
                body=body,
                status=self._status if first else None,
                content_type=self._content_type if first else None,
                error=error,
                prompt_tokens=self.usage[0] if last and self.usage else None,
                completion_tokens=self.usage[1] if last and self.usage else None,
                queue_ms=self.queue_ms if last else None,
                liveness_queue=self._liveness_queue,
            )
            self._seq += 1
            self._last_flush = time.monotonic()
            if last:
                self.finished = True
            await self._publish(reply)


class ReplyPublisher:
    """Publishes reply pieces of one request to the sender's reply queue.

    Straight through aiormq: replies are the most frequent messages (several per
    streamed answer) and aio-pika's message wrapper adds about half again to the
    cost of each.
    """

    def __init__(self, channel: AbstractChannel, reply_to: str, correlation_id: str) -> None:
        self._channel = channel
        self._reply_to = reply_to
        self._correlation_id = correlation_id
        self.lost = False
        """A piece could not be published (the connection dropped): the answer cannot be complete,
        so the request must go back to the queue rather than be acked."""

    async def __call__(self, reply: Reply) -> None:
        properties = reply.properties(self._correlation_id)
        try:
            channel = await self._channel.get_underlay_channel()
            # Not mandatory: a reply to a sender that is gone has nobody to go to.
            await channel.basic_publish(reply.body, routing_key=self._reply_to, properties=properties)
        except BROKER_GONE:
            self.lost = True
