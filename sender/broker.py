"""The sender's connections to RabbitMQ and their channels; what travels on them lives elsewhere.

Two robust connections, each to one of the ``RABBITMQ_URL`` nodes
(:mod:`contract.broker_connection`). The publishing one carries the requests
(publisher confirms) and the control messages (roll calls, cancellations).
The consuming one never publishes: it reads this sender's reply queue and the
announcements, and opens the short-lived channels for passive declares (queue
numbers, liveness), which the broker closes whenever a queue does not exist. A
memory or disk alarm blocks only connections that publish: replies keep
coming in while new requests cannot go out. :mod:`sender.calls` publishes
requests and routes their replies; :mod:`sender.queue_stats` reads the model
queues. Keeping the connections apart gives both one place to change when the
broker does (reconnection, channel kinds, queue types).

The reply queue is durable and not exclusive: an exclusive queue dies with its
connection, and with it every reply in flight during a reconnect; a durable one
keeps the replies sent while the broker restarted and this sender had not yet
reconnected. ``x-expires`` removes it once this sender is gone for good. On
RabbitMQ 4.3 and later it is a quorum queue (:mod:`contract.queues`), so a node
lost does not strand it or the replies it holds. Each reply is acked once it
was handed over, so one delivered on a connection that died comes again.

This class alone subscribes to the reply queue, straight on the aiormq channel
(outside aio-pika's robust bookkeeping): after the channel reopens (a
reconnect) and when the broker cancels the subscription (the queue failed
over, or was deleted), one task redeclares the queue on whichever node this
sender is connected to and subscribes again. Without that, a cancelled
subscription would leave the sender deaf to every answer until restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

import contract
from contract import broker_connection, liveness, queues
from contract.errors import BROKER_GONE

log = logging.getLogger(__name__)

ReplyHandler = Callable[[aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]]


class BrokerUnavailable(Exception):
    """The broker cannot be asked right now: not connected, or the connection dropped under the call."""


class Broker:
    """Connection to RabbitMQ for one sender process."""

    def __init__(
        self,
        urls: list[str],
        *,
        reconnect_interval: float = 1.0,
        ssl_context: ssl.SSLContext | None = None,
        models: tuple[str, ...] = (),
        max_priority: int = contract.DEFAULT_MAX_PRIORITY,
        queue_type: queues.QueueTypeSetting = "auto",
    ) -> None:
        self._urls = urls
        self.models = models
        """The configured models, whose queues this sender declares (``SENDER_MODELS``)."""
        self._max_priority = max_priority
        self._background: set[asyncio.Task[None]] = set()
        self._queue_type_setting: queues.QueueTypeSetting = queue_type
        self.queue_type = queues.QueueType.CLASSIC
        """Type of the reply queue, chosen when connecting (:mod:`contract.queues`)."""
        self._ssl_context = ssl_context
        self._reconnect_interval = reconnect_interval
        self.instance_id = uuid.uuid4().hex[:12]
        self.reply_queue_name = contract.REPLY_QUEUE_PREFIX + self.instance_id
        self._publishing: AbstractRobustConnection | None = None
        self._consuming: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._reply_channel: AbstractRobustChannel | None = None
        self._control: AbstractExchange | None = None
        self.disturbed_at = float("-inf")
        """When (monotonic) a connection was last lost or restored: consumers may not be back yet."""
        self._on_reply: ReplyHandler | None = None
        self._on_announcement: ReplyHandler | None = None
        self._on_replies_lost: Callable[[], None] = lambda: None
        self._announcements_channel: aiormq.abc.AbstractChannel | None = None
        self._reply_channel_used: aiormq.abc.AbstractChannel | None = None
        self._acks: tuple[aiormq.abc.AbstractChannel, int] | None = None
        """The reply channel and its highest delivery tag handed over and not yet acked."""
        """The aiormq channel the reply subscription was made on."""
        self._reply_tag: str | None = None
        self._subscribe = asyncio.Event()
        self._subscriber: asyncio.Task[None] | None = None
        self.reply_resubscriptions = 0
        """Times the reply subscription was made again (reconnects, broker cancels)."""

    @property
    def connected(self) -> bool:
        """Both connections are up (the publishing channel may still be reopening)."""
        return _up(self._publishing) and _up(self._consuming)

    @property
    def ready(self) -> bool:
        """Connected, and the channel that publishes requests is open."""
        channel = self._publish_channel
        return self.connected and channel is not None and not channel.is_closed

    @property
    def control(self) -> AbstractExchange | None:
        """The control exchange (announcements, roll calls, cancellations), once connected."""
        return self._control

    async def connect(
        self,
        *,
        on_reply: ReplyHandler,
        on_announcement: Callable[[bytes], None],
        on_reconnect: Callable[[], None] = lambda: None,
        on_replies_lost: Callable[[], None] = lambda: None,
    ) -> None:
        """Connect, subscribe ``on_reply`` to this sender's reply queue, listen to announcements
        and ask the consumers to announce themselves."""
        self._consuming = await self._connect("consume")
        self._publishing = await self._connect("publish")
        # Declared on the consuming connection (open_channel): again whenever it comes back.
        self._consuming.reconnect_callbacks.add(lambda *_: self._in_background(self.declare_queues()))

        def disturbed(*_: object) -> None:
            self.disturbed_at = time.monotonic()

        def reconnected(*_: object) -> None:
            disturbed()
            on_reconnect()

        for connection in (self._consuming, self._publishing):
            connection.close_callbacks.add(disturbed)
            connection.reconnect_callbacks.add(reconnected)
        self._publish_channel = await self._publishing.channel(publisher_confirms=True, on_return_raises=True)
        control_channel = await self._publishing.channel(publisher_confirms=False)
        self._control = await control_channel.declare_exchange(
            contract.CONTROL_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        transport = self._consuming.transport
        assert transport is not None
        self.queue_type = queues.choose(self._queue_type_setting, queues.server_version(transport.connection))
        reply_channel = await self._consuming.channel(publisher_confirms=False)
        await reply_channel.set_qos(prefetch_count=0)
        # Replies are consumed straight through aiormq (no aio-pika message object
        # and one task less per piece); subscribed again by one task only.
        self._reply_channel = reply_channel
        self._on_reply = on_reply
        self._on_replies_lost = on_replies_lost
        await self._consume_replies()
        reply_channel.reopen_callbacks.add(lambda *_: self._subscribe.set())
        self._subscriber = asyncio.create_task(self._subscription_loop())

        async def announcement(message: aiormq.abc.DeliveredMessage) -> None:
            on_announcement(message.body)

        self._on_announcement = announcement
        await self._listen_announcements()
        await self._control.publish(
            contract.rollcall_message(), routing_key=contract.ROLLCALL_KEY, mandatory=False
        )
        await self.declare_queues()

    async def declare_queues(self) -> None:
        """Declare the cancellation stream and the configured models' queues, at start and after
        each reconnect (the broker may have lost them). A model queue declared here lets a model
        that never ran be woken: its requests wait in its queue, whose depth is what the autoscaler
        reads. What cannot be declared is logged; a model whose queue is missing is then refused as
        if it was not configured, and cancellations reach only the consumers running."""
        try:
            await self._declare_cancel_stream()
            for model in self.models:
                try:
                    await self.declare_model_queue(model)
                except (aiormq.exceptions.ChannelClosed, queues.QueueTypeMismatch) as exc:
                    log.error("could not declare the queue of model %s: %s", model, exc)
        except BrokerUnavailable:
            pass  # the connection dropped: declared again once it is back

    async def _declare_cancel_stream(self) -> None:
        """The stream that keeps every cancellation for consumers that start later
        (:data:`contract.CANCEL_STREAM`), bound to the control exchange's ``cancel`` key."""
        channel = await self.open_channel()
        try:
            await channel.queue_declare(
                contract.CANCEL_STREAM, durable=True, arguments=contract.CANCEL_STREAM_ARGUMENTS, timeout=10
            )
            await channel.queue_bind(
                contract.CANCEL_STREAM, contract.CONTROL_EXCHANGE, routing_key=contract.CANCEL_KEY, timeout=10
            )
        except aiormq.exceptions.ChannelClosed as exc:
            log.error("could not declare the cancellation stream %s: %s", contract.CANCEL_STREAM, exc)
        except BROKER_GONE as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def declare_model_queue(self, model: str) -> None:
        """Declare ``model``'s queue exactly as its consumers do (:mod:`contract.queues`: its type from
        the broker's version or the setting, a queue that exists with the other type used as it is).

        On plain channels of their own: the broker closes a channel whose declare it refuses, and a
        robust one would redeclare the queue on reconnect."""
        transport = self._consuming_transport()
        preferred = queues.choose(
            self._queue_type_setting, queues.server_version(transport), self._max_priority
        )
        try:
            await queues.declare(
                transport,
                contract.model_queue(model),
                queues.model_queue_choices(self._max_priority),
                preferred,
                fixed=self._queue_type_setting != "auto",
            )
        except aiormq.exceptions.ChannelClosed:
            raise  # refused by the broker (no permission): not a lost connection
        except BROKER_GONE as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc
        except asyncio.CancelledError:
            if really_cancelled():
                raise
            raise BrokerUnavailable("connection lost") from None

    def _in_background(self, step: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(step)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _connect(self, role: str) -> AbstractRobustConnection:
        return await broker_connection.connect(
            self._urls,
            name=f"sender-{self.instance_id}-{role}",
            reconnect_interval=self._reconnect_interval,
            ssl_context=self._ssl_context,
        )

    async def _consume_replies(self) -> None:
        """Declare the reply queue (again) and subscribe to it, unless already subscribed on this channel."""
        assert self._reply_channel is not None and self._on_reply is not None
        channel = await self._reply_channel.get_underlay_channel()
        if channel is self._reply_channel_used and self._reply_tag is not None:
            return  # still subscribed on this channel
        # On the reply channel itself (the name is this sender's alone, so its type cannot clash):
        # no extra channel opened while the connection may be recovering.
        await channel.queue_declare(
            self.reply_queue_name,
            durable=True,
            arguments=queues.reply_queue_arguments(self.queue_type, contract.REPLY_QUEUE_EXPIRES_MS),
            timeout=10,
        )
        if channel is not self._reply_channel_used:
            channel.on_consumer_cancel_callbacks.add(self._on_cancel)
            self._reply_channel_used = channel
        consume = await channel.basic_consume(self.reply_queue_name, self._reply_delivered, no_ack=False)
        self._reply_tag = consume.consumer_tag

    async def _reply_delivered(self, message: aiormq.abc.DeliveredMessage) -> None:
        """Hand a reply piece over, then ack it. Acked only once handed over: a piece delivered on a
        connection that died with its node (or dropped) goes back to the queue and comes again on the
        next subscription; auto-ack lost it, and a whole answer in one piece then waited for its
        deadline. A piece handed over whose ack was lost comes twice; the second copy is dropped
        (:mod:`sender.calls`)."""
        assert self._on_reply is not None
        try:
            await self._on_reply(message)
        finally:
            delivery = message.delivery
            if isinstance(delivery, aiormq.spec.Basic.Deliver) and delivery.delivery_tag is not None:
                self._ack_soon(message.channel, delivery.delivery_tag)

    def _ack_soon(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        """Ack the pieces handed over during this turn of the event loop with one ``multiple`` ack.

        Deliveries are handed over in the order they arrive (each one's task runs without waiting),
        so every tag up to the highest handed over is handed over too. Under load many pieces come
        in one read: one ack frame (and one write, and one settlement for the broker) stands for
        them all instead of one each."""
        if self._acks is not None and self._acks[0] is not channel:
            self._send_acks()  # the subscription moved: what the old channel held goes first
        pending = self._acks
        self._acks = (channel, tag)
        if pending is None:
            asyncio.get_running_loop().call_soon(self._send_acks)

    def _send_acks(self) -> None:
        if self._acks is None:
            return
        channel, tag = self._acks
        self._acks = None
        if not channel.is_closed:
            self._in_background(_ack(channel, tag))

    async def _listen_announcements(self) -> None:
        """Listen to the consumers' announcements through a queue of this connection, made again on
        each new channel (see ``liveness.listen``)."""
        assert self._reply_channel is not None and self._on_announcement is not None
        channel = await self._reply_channel.get_underlay_channel()
        if channel is self._announcements_channel:
            return
        await liveness.listen(
            channel, contract.CONTROL_EXCHANGE, (contract.ANNOUNCE_KEY,), self._on_announcement
        )
        self._announcements_channel = channel

    def _on_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        if frame.consumer_tag == self._reply_tag:
            log.warning("the broker cancelled the reply subscription; subscribing again to a new reply queue")
            self._reply_tag = None
            # A new name: a quorum queue declared again under the name just deleted can fail to start
            # (``noproc`` on consume), and replies still addressed to the old name are lost anyway.
            self.reply_queue_name = f"{contract.REPLY_QUEUE_PREFIX}{self.instance_id}.{uuid.uuid4().hex[:6]}"
            # Cancelled with its queue deleted (a quorum queue failing over keeps its consumers):
            # the replies it held are gone, and nobody must wait for them until the deadline.
            self._on_replies_lost()
            self._subscribe.set()

    async def _subscription_loop(self) -> None:
        """The one owner of re-subscribing to the reply queue; retried until it works."""
        while True:
            await self._subscribe.wait()
            self._subscribe.clear()
            try:
                await self._consume_replies()
                await self._listen_announcements()
            except asyncio.CancelledError:
                if really_cancelled():
                    raise
            except Exception as exc:
                log.warning("could not subscribe to the reply queue again (%s); trying again", exc)
            else:
                self.reply_resubscriptions += 1
                continue
            await asyncio.sleep(self._reconnect_interval)
            self._subscribe.set()

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber
        for connection in (self._publishing, self._consuming):
            if connection is not None:
                await connection.close()

    def request_exchange(self) -> AbstractExchange:
        """Where requests are published: the default exchange, on the channel with publisher confirms."""
        if self._publish_channel is None or not self.ready:
            raise BrokerUnavailable("not connected to the broker")
        try:
            return self._publish_channel.default_exchange
        except BROKER_GONE as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc

    async def open_channel(self) -> aiormq.abc.AbstractChannel:
        """A plain channel (no confirms), e.g. for passive declares; the caller closes it.

        A bare channel of the connection, outside aio-pika's robust bookkeeping: a robust channel
        that the broker closes (a passive declare of a queue that does not exist) reopens itself,
        and each one that does stays open on the broker, until the connection reaches its
        ``channel_max`` and the broker closes it: about 2,000 made-up model names did that."""
        return await self._consuming_transport().channel(publisher_confirms=False)

    async def vanished(self, queues: set[str], unreachable: list[str] | None = None) -> list[str]:
        """Which of these liveness queues no longer exist (their consumer connection is gone); those
        that did not answer in time go to ``unreachable``."""
        return await liveness.vanished(self._consuming_transport(), queues, unreachable)

    def _consuming_transport(self) -> aiormq.abc.AbstractConnection:
        """The consuming connection's own AMQP connection: it never publishes, so no alarm blocks it."""
        connection = self._consuming
        if connection is None or connection.transport is None or not _up(connection):
            raise BrokerUnavailable("not connected to the broker")
        return connection.transport.connection


def _up(connection: AbstractRobustConnection | None) -> bool:
    return connection is not None and connection.connected.is_set() and not connection.is_closed


def really_cancelled() -> bool:
    """Whether this task was cancelled, rather than an AMQP call's future when its connection dropped
    (aiormq cancels those, which would otherwise end the task that awaited it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _ack(channel: aiormq.abc.AbstractChannel, tag: int) -> None:
    """Ack every delivery of ``channel`` up to ``tag``; a channel that closed meanwhile gives them
    back to the queue, which redelivers them (the sender drops the copies it already had)."""
    with contextlib.suppress(*BROKER_GONE):
        await channel.basic_ack(tag, multiple=True, wait=False)
