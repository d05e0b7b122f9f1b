"""The sender's side of RabbitMQ: publish requests, route replies, read queue depth.

One robust connection holds three channels: one that publishes with
publisher confirms (a request the broker did not take is an error, never a
silent loss), one that consumes this sender's reply queue, and one for passive
declares, which the broker closes whenever a queue does not exist.

Requests are persistent and the reply queue durable, so a broker restart
loses neither the requests waiting for a consumer nor the replies sent to a
sender still reconnecting. A streamed answer names the consumer connection
that serves it; a watchdog checks that connection's liveness queue, so a
consumer that dies mid-answer ends the answer with an error at once rather
than at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

import contract
from contract import Cancel, Reply, Request, liveness
from contract.errors import BROKER_GONE

log = logging.getLogger(__name__)


class PublishFailed(Exception):
    """The broker did not accept a request (no such queue, nack, or no connection)."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    exists: bool
    messages: int
    consumers: int


class PendingCall:
    """The replies to one published request, in order, as they arrive."""

    def __init__(
        self, correlation_id: str, model: str, deadline: float, on_done: Callable[[PendingCall], None]
    ) -> None:
        self.correlation_id = correlation_id
        self.model = model
        self.deadline = deadline
        self._replies: asyncio.Queue[Reply] = asyncio.Queue()
        self._on_done = on_done
        self._expected_seq = 0
        self.owner: str | None = None
        """Liveness queue of the consumer serving the answer, from its first piece."""
        self.finished = False
        """Whether the last piece of the answer arrived."""
        self.owner_gone = False
        self.abandoned = False
        self.publish_error: str | None = None
        """Set when the broker refused the request; the call then ends without any reply."""
        self.final: Reply | None = None
        """The last piece of the answer, once it arrived (it carries the usage)."""
        self.answered = False
        """Whether any piece arrived: a consumer took the request off the queue."""

    def deliver(self, reply: Reply) -> None:
        self._replies.put_nowait(reply)

    def publish_failed(self, error: str) -> None:
        self.publish_error = error
        self.deliver(Reply(seq=self._expected_seq, last=True, error=error))

    async def next(self, wait: float) -> Reply:
        """The next piece of the answer; ``TimeoutError`` if none comes in time.

        A gap in the sequence means a piece was lost in the broker: the answer
        cannot be trusted any more, so it ends with an error instead.
        """
        async with asyncio.timeout(max(wait, 0.0)):
            while True:
                reply = await self._replies.get()
                if self.abandoned or self.publish_error is not None:
                    return reply
                if reply.liveness_queue is not None:
                    if self.owner is None:
                        self.owner = reply.liveness_queue
                    elif reply.liveness_queue != self.owner:
                        continue  # a redelivered copy served by another consumer: the first answer stands
                return self._check(reply)

    def _check(self, reply: Reply) -> Reply:
        if reply.seq != self._expected_seq:
            return Reply(seq=reply.seq, last=True, error=f"reply piece {self._expected_seq} was lost")
        self._expected_seq += 1
        self.finished = reply.last
        if reply.last:
            self.final = reply
        return reply

    def consumer_gone(self) -> None:
        """The consumer serving the answer lost its broker connection: the answer will not go on."""
        self.owner_gone = True
        self.deliver(
            Reply(
                seq=self._expected_seq,
                last=True,
                error="the model server stopped in the middle of the answer",
                liveness_queue=self.owner,
            )
        )

    def abandon(self, reason: str = "the client went away") -> None:
        """Nobody will read the answer: end the wait for it now."""
        self.abandoned = True
        self.deliver(Reply(seq=self._expected_seq, last=True, error=reason))

    def close(self) -> None:
        """Stop listening; an unfinished request is cancelled wherever it is (queued or running)."""
        self._on_done(self)


class Broker:
    """Connection to RabbitMQ for one sender process."""

    _STATS_WATCH_IDLE = 5.0
    """Seconds without a request after which a model's queue stats are no longer kept fresh."""

    def __init__(
        self,
        url: str,
        *,
        stats_ttl: float,
        on_stats: Callable[[str, QueueStats], None] = lambda *_: None,
        reconnect_interval: float = 1.0,
        liveness_interval: float = 1.0,
        confirm_timeout: float = 10.0,
    ) -> None:
        self._url = url
        self._reconnect_interval = reconnect_interval
        self._confirm_timeout = confirm_timeout
        self._liveness_interval = liveness_interval
        self._liveness_task: asyncio.Task[None] | None = None
        self._stats_ttl = stats_ttl
        self._on_stats = on_stats
        self.instance_id = uuid.uuid4().hex[:12]
        self.reply_queue_name = contract.REPLY_QUEUE_PREFIX + self.instance_id
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._reply_channel: AbstractRobustChannel | None = None
        self._control: AbstractExchange | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._stats_channel: AbstractChannel | None = None
        self._stats_lock = asyncio.Lock()
        self._stats: dict[str, tuple[float, QueueStats]] = {}
        """model -> (monotonic time fetched, stats)"""
        self._stats_used: dict[str, float] = {}
        self._stats_watchers: dict[str, asyncio.Task[None]] = {}
        self._stats_pending: dict[str, asyncio.Future[QueueStats]] = {}
        self._fresh_pending: dict[str, asyncio.Future[QueueStats]] = {}
        self._pending: dict[str, PendingCall] = {}
        self._announce_queue: AbstractQueue | None = None

    @property
    def connected(self) -> bool:
        connection = self._connection
        return connection is not None and connection.connected.is_set() and not connection.is_closed

    async def connect(
        self, on_announcement: Callable[[bytes], None], on_reconnect: Callable[[], None] = lambda: None
    ) -> None:
        self._connection = await aio_pika.connect_robust(
            self._url,
            client_properties={"connection_name": f"sender-{self.instance_id}"},
            reconnect_interval=self._reconnect_interval,
        )
        self._connection.reconnect_callbacks.add(lambda *_: on_reconnect())
        self._publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)

        reply_channel = await self._connection.channel(publisher_confirms=False)
        await reply_channel.set_qos(prefetch_count=0)
        # Not exclusive: an exclusive queue dies with its connection, and with it
        # every reply in flight during a reconnect. Durable: replies sent while the
        # broker restarted and this sender had not yet reconnected still land here.
        # x-expires removes it once this sender is gone for good.
        await reply_channel.declare_queue(
            self.reply_queue_name, durable=True, arguments={"x-expires": contract.REPLY_QUEUE_EXPIRES_MS}
        )
        # Replies are consumed straight through aiormq (no aio-pika message object
        # and one task less per piece); re-subscribed whenever the channel reopens.
        self._reply_channel = reply_channel
        await self._consume_replies()
        reply_channel.reopen_callbacks.add(lambda _: self._consume_replies())

        control = await reply_channel.declare_exchange(
            contract.CONTROL_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._control = control
        self._announce_queue = await reply_channel.declare_queue(exclusive=True, auto_delete=True)
        await self._announce_queue.bind(control, contract.ANNOUNCE_KEY)

        async def announcement(message: AbstractIncomingMessage) -> None:
            on_announcement(message.body)

        await self._announce_queue.consume(announcement, no_ack=True)
        await control.publish(contract.rollcall_message(), routing_key=contract.ROLLCALL_KEY, mandatory=False)
        self._liveness_task = asyncio.create_task(self._watch_liveness())

    async def close(self) -> None:
        if self._liveness_task is not None:
            self._liveness_task.cancel()
        for watcher in list(self._stats_watchers.values()):
            watcher.cancel()
        for call in list(self._pending.values()):
            call.abandon("the dispatcher is shutting down")
        if self._connection is not None:
            await self._connection.close()

    async def call(self, model: str, request: Request) -> PendingCall:
        """Publish ``request`` to the model's queue and return where its replies will arrive.

        The publisher confirm is awaited alongside the answer rather than before it,
        which saves a broker round trip per request; a nack or a return (no such
        queue) still ends the call with :attr:`PendingCall.publish_error`.
        """
        if self._publish_channel is None or not self.connected:
            raise PublishFailed("not connected to the broker")
        correlation_id = uuid.uuid4().hex
        request = dataclasses.replace(request, correlation_id=correlation_id, reply_to=self.reply_queue_name)
        pending = PendingCall(correlation_id, model, request.deadline, self._forget)
        self._pending[correlation_id] = pending
        message = request.message()
        try:
            exchange = self._publish_channel.default_exchange
        except BROKER_GONE as exc:
            self._pending.pop(correlation_id, None)
            raise PublishFailed(type(exc).__name__) from exc
        confirm = asyncio.ensure_future(
            exchange.publish(message, routing_key=contract.model_queue(model), mandatory=True)
        )
        # A confirm lost with its connection must not leave the client waiting until the deadline.
        overdue = asyncio.get_running_loop().call_later(self._confirm_timeout, confirm.cancel)
        confirm.add_done_callback(lambda done: self._confirmed(pending, done, overdue))
        self._note_published(model)
        return pending

    def _confirmed(
        self, pending: PendingCall, confirm: asyncio.Future[Any], overdue: asyncio.TimerHandle
    ) -> None:
        overdue.cancel()
        if confirm.cancelled():
            pending.publish_failed("publishing was cancelled")
            return
        exc = confirm.exception()
        if exc is not None:
            log.warning("broker refused a request: %s", type(exc).__name__)
            pending.publish_failed(str(exc) or type(exc).__name__)

    def _forget(self, call: PendingCall) -> None:
        self._pending.pop(call.correlation_id, None)
        # Also after a failed publish: a confirm lost with the connection may hide a request
        # the broker did take.
        # And when the consumer died mid-answer: the broker hands its copy to another consumer.
        if (not call.finished or call.owner_gone) and self._control is not None:
            task = asyncio.ensure_future(self._send_cancel(call))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_cancel(self, call: PendingCall) -> None:
        assert self._control is not None
        message = Cancel(call.correlation_id, call.deadline).message()
        with contextlib.suppress(*BROKER_GONE):
            await self._control.publish(message, routing_key=contract.CANCEL_KEY, mandatory=False)

    async def _consume_replies(self) -> None:
        assert self._reply_channel is not None
        channel = await self._reply_channel.get_underlay_channel()
        await channel.basic_consume(self.reply_queue_name, self._on_reply, no_ack=True)

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        pending = self._pending.get(properties.correlation_id or "")
        if pending is None:
            return  # the client gave up; nobody waits for this any more
        try:
            reply = Reply.from_properties(properties, message.body)
        except contract.ContractError as exc:
            log.warning("malformed reply dropped: %s", exc)
            reply = Reply(seq=-1, last=True, error="malformed reply from consumer")
        if not pending.answered:
            pending.answered = True
            self._note_taken(pending.model)
        pending.deliver(reply)

    async def _watch_liveness(self) -> None:
        """End the answers whose consumer connection is gone (its liveness queue no longer exists)."""
        while True:
            await asyncio.sleep(self._liveness_interval)
            owners = {call.owner for call in self._pending.values() if call.owner and not call.finished}
            if not owners:
                continue
            try:
                async with asyncio.timeout(max(2.0, self._liveness_interval * 2)):
                    gone = await self._gone(owners)
            except asyncio.CancelledError:
                if _really_cancelled():
                    raise
                continue  # the connection dropped under the check: again next round
            except Exception as exc:  # disconnected: check again next round
                log.info("liveness check skipped: %s", type(exc).__name__)
                continue
            for owner in gone:
                log.warning("a consumer lost its broker connection in the middle of answers")
                for call in list(self._pending.values()):
                    if call.owner == owner and not call.finished:
                        call.consumer_gone()

    async def _gone(self, owners: set[str]) -> list[str]:
        """Which of these liveness queues no longer exist."""
        if self._connection is None or self._connection.transport is None or not self.connected:
            raise PublishFailed("not connected to the broker")
        return await liveness.vanished(self._connection.transport.connection, owners)

    async def queue_stats(self, model: str, *, fresh: bool = False) -> QueueStats:
        """Depth and consumer count of the model's queue, about ``stats_ttl`` old.

        For a queue that exists, a background task keeps the numbers fresh while
        requests for the model keep coming, so requests do not wait for a broker
        round trip; the first request after a quiet spell (and any request for a
        model without a queue) waits for a fresh passive declare, shared by all
        requests arriving meanwhile. ``fresh`` asks for numbers read after the call.
        """
        now = time.monotonic()
        self._stats_used[model] = now
        cached = None if fresh else self._stats.get(model)
        if cached is not None:
            fetched_at, stats = cached
            if now - fetched_at < self._stats_ttl or (stats.exists and model in self._stats_watchers):
                return stats
        pending = self._fresh_pending if fresh else self._stats_pending
        task = pending.get(model)
        if task is None:
            task = asyncio.ensure_future(self._fetch_stats(model))
            pending[model] = task
            task.add_done_callback(lambda _: pending.pop(model, None))
        stats = await asyncio.shield(task)
        if stats.exists and model not in self._stats_watchers:
            self._stats_watchers[model] = asyncio.create_task(self._watch_stats(model))
        return stats

    async def _watch_stats(self, model: str) -> None:
        try:
            while time.monotonic() - self._stats_used.get(model, 0.0) < self._STATS_WATCH_IDLE:
                await asyncio.sleep(self._stats_ttl)
                try:
                    stats = await self._fetch_stats(model)
                except Exception as exc:
                    log.warning("queue stats of %s failed: %s", model, type(exc).__name__)
                    return
                if not stats.exists:
                    return
        finally:
            self._stats_watchers.pop(model, None)

    def _note_published(self, model: str) -> None:
        self._adjust_depth(model, +1)

    def _note_taken(self, model: str) -> None:
        self._adjust_depth(model, -1)

    def _adjust_depth(self, model: str, change: int) -> None:
        """Keep the cached depth close between two reads: this sender's own requests count from
        their publish until their first reply. Counting publishes alone would let the estimate
        climb by the request rate times the read interval and refuse tokens whose threshold
        the real queue never reached."""
        cached = self._stats.get(model)
        if cached is not None:
            stats = cached[1]
            depth = max(0, stats.messages + change)
            self._stats[model] = (cached[0], QueueStats(stats.exists, depth, stats.consumers))

    async def _fetch_stats(self, model: str) -> QueueStats:
        try:
            return await self._read_stats(model)
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
            raise PublishFailed("connection lost") from None
        except BROKER_GONE as exc:
            # A connection or channel closed under us: the broker is out of reach for now.
            raise PublishFailed(type(exc).__name__) from exc

    async def _read_stats(self, model: str) -> QueueStats:
        async with self._stats_lock:
            channel = await self._stats_underlay()
            try:
                declared = await channel.queue_declare(contract.model_queue(model), passive=True, timeout=5)
            except aiormq.exceptions.ChannelNotFoundEntity:
                await self._drop_stats_channel()
                stats = QueueStats(exists=False, messages=0, consumers=0)
            else:
                assert declared is not None
                stats = QueueStats(
                    exists=True,
                    messages=declared.message_count or 0,
                    consumers=declared.consumer_count or 0,
                )
        self._stats[model] = (time.monotonic(), stats)
        if stats.exists:
            self._on_stats(model, stats)
        if len(self._stats) > 10_000:
            self._stats.clear()
            self._stats_used.clear()
        return stats

    async def _stats_underlay(self) -> aiormq.abc.AbstractChannel:
        if self._stats_channel is None or self._stats_channel.is_closed:
            if self._connection is None or not self.connected:
                raise PublishFailed("not connected to the broker")
            self._stats_channel = await self._connection.channel(publisher_confirms=False)
        return await self._stats_channel.get_underlay_channel()

    async def _drop_stats_channel(self) -> None:
        """The broker closed the channel (NOT_FOUND); close our side too so it is not reopened."""
        channel, self._stats_channel = self._stats_channel, None
        if channel is not None:
            with contextlib.suppress(Exception):  # already closed by the broker
                await channel.close()


def _really_cancelled() -> bool:
    """Whether this task was cancelled, rather than an AMQP call's future when its connection dropped
    (aiormq cancels those, which would otherwise end the task that awaited it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
