"""Writes one request's answer back to the sender, as the contract's numbered pieces, and publishes them.

A streamed answer is batched: everything up to and including the first token
goes out at once (time to first token matters: a chat stream's role-only
opening event does not count as the first token), later bytes at most every
``interval`` seconds or when ``max_bytes`` pile up, so the broker carries a few messages per answer, not
one per token. :class:`ReplyWriter` only numbers and batches (it is tested
without a broker); :class:`ReplyPublisher` puts each piece on the wire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiormq.exceptions
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from consumer.token_counts import Counts, carries_token
from contract import Reply

Publish = Callable[[Reply], Awaitable[None]]


class ReplyWriter:
    def __init__(
        self,
        publish: Publish,
        *,
        liveness_queue: str,
        interval: float,
        max_bytes: int,
        max_interval: float | None = None,
    ) -> None:
        self._publish = publish
        self._liveness_queue = liveness_queue
        self._interval = interval
        self._max_interval = interval if max_interval is None else max(interval, max_interval)
        self._max_bytes = max_bytes
        self._seq = 0
        self._status: int | None = None
        self._content_type: str | None = None
        self._buffer = bytearray()
        self._last_flush = float("-inf")
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._opened = False
        """Whether a piece holding a token went out: until then nothing waits for a timer."""
        self.finished = False
        self.usage: Counts | None = None
        """(prompt, completion) tokens as the backend reported them; sent with the last piece."""
        self.count: Callable[[], Counts] | None = None
        """Counts the tokens of a stream under way: what the last piece says when ``usage`` is not set
        (an answer cut short)."""
        self.reported: Counts | None = None
        """The counts the last piece carried."""
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
        if not self._opened:
            self._opened = carries_token(data)
            await self._flush(last=False)
            return
        due = self._last_flush + self._interval
        if len(self._buffer) >= self._max_bytes or time.monotonic() >= due:
            await self._batch()
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

    async def cut(self, error: str) -> None:
        """The client is gone: drop what is batched and send only a last piece, with the token counts.

        Nobody reads the answer any more, but the sender waits a while for this
        piece to charge the tokens generated up to the cut to the request.
        """
        if self.finished:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buffer.clear()
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
        await self._batch()

    async def _batch(self) -> None:
        """Send a batch after the first token, and wait longer for the next one."""
        self._interval = min(self._interval * 2, self._max_interval)
        await self._flush(last=False)

    async def _flush(self, *, last: bool, error: str | None = None) -> None:
        """Publish what piled up, in pieces of at most ``max_bytes`` (one broker message each: a
        non-streamed answer larger than that goes as several, which the sender joins again)."""
        async with self._lock:
            if self.finished or (not last and not self._buffer):
                return
            data = bytes(self._buffer)
            self._buffer.clear()
            start = 0
            while True:
                body = data[start : start + self._max_bytes]
                start += len(body)
                final = last and start >= len(data)
                await self._publish_piece(body, last=final, error=error if final else None)
                if start >= len(data) or self.finished:
                    return

    async def _publish_piece(self, body: bytes, *, last: bool, error: str | None) -> None:
        first = self._seq == 0
        usage = None
        if last:
            usage = self.usage if self.usage is not None else self.count() if self.count else None
            self.reported = usage
        reply = Reply(
            seq=self._seq,
            last=last,
            body=body,
            status=self._status if first else None,
            content_type=self._content_type if first else None,
            error=error,
            prompt_tokens=usage[0] if usage else None,
            completion_tokens=usage[1] if usage else None,
            queue_ms=self.queue_ms if last else None,
            liveness_queue=self._liveness_queue,
        )
        self._seq += 1
        self._last_flush = time.monotonic()
        if last:
            self.finished = True
        await self._publish(reply)


class ReplyPublisher:
    """Publishes reply pieces of one request to the sender's reply queue, and hears of any lost.

    Straight through aiormq: replies are the most frequent messages (several per
    streamed answer) and aio-pika's message wrapper adds about half again to the
    cost of each. Pieces are published ``mandatory`` on a channel with publisher
    confirms, and each confirm is awaited before the next piece goes: a broker
    round trip, during which what the backend sends piles up for the next piece
    (the writer batches anyway), and no task per piece. A piece the broker
    returned (the sender's reply queue is gone), nacked, or lost with its channel
    calls ``on_lost`` at once.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        reply_to: str,
        correlation_id: str,
        on_lost: Callable[[str], None] = lambda _: None,
    ) -> None:
        self._channel = channel
        self._reply_to = reply_to
        self._correlation_id = correlation_id
        self._on_lost = on_lost
        self._lost = False
        self.lost = False
        """A piece could not be published (the connection dropped): the answer cannot be complete,
        so the request must go back to the queue rather than be acked."""

    async def __call__(self, reply: Reply) -> None:
        if self._lost:
            return  # the sender cannot take the rest of this answer either
        properties = reply.properties(self._correlation_id)
        try:
            channel = await self._channel.get_underlay_channel()
            confirm = await channel.basic_publish(
                reply.body, routing_key=self._reply_to, properties=properties, mandatory=True
            )
        except aiormq.exceptions.DeliveryError:
            self._lose("nacked")
        except Exception:
            # aiormq fails the calls of a connection closing under them with its reason, or with a
            # bare ``Exception``: either way the piece was not confirmed, so it may be lost.
            self.lost = True
            self._lose("broker_gone")
        else:
            if confirm is not None and not isinstance(confirm, Basic.Ack):
                self._lose("no_reply_queue")  # returned: a mandatory publish that no queue took

    def _lose(self, reason: str) -> None:
        if not self._lost:
            self._lost = True
            self._on_lost(reason)
