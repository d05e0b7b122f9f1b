"""The flow window as consumers of the model queue, each with a prefetch of one.

The window must change at once in both directions (only what the backend can
start now may leave the broker). A channel-wide (``global``) prefetch did that,
but RabbitMQ 4.3 denies it. So the window is a number of consumers on one
channel, each allowed one unacknowledged message: the broker hands a message
only to a consumer that holds none. Growing opens consumers; shrinking cancels
idle ones at once, and a busy one when its message is done, just before that
message is settled (once acked, the broker would hand it the next one). So the
messages held never outnumber the window once it has shrunk, as with the
channel-wide prefetch. A cancelled consumer's message stays ackable on the
channel.

These consumers are made on the bare aiormq channel, outside aio-pika's robust
bookkeeping, and this class is their only owner: after the channel reopens
(a reconnect), the worker calls :meth:`attach` once with the new channel and
the slots are made again from the window; when the broker cancels a consumer
(its quorum queue failed over, or was deleted), :meth:`attach`'s
``on_broker_cancel`` hears of it and the worker subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from contract.errors import BROKER_GONE

log = logging.getLogger(__name__)


def _tags(message: aiormq.abc.DeliveredMessage) -> tuple[str, int | None]:
    """The consumer tag and delivery tag of a delivery."""
    delivery = message.delivery
    assert isinstance(delivery, Basic.Deliver)
    return delivery.consumer_tag or "", delivery.delivery_tag


Deliver = Callable[["Slots", aiormq.abc.DeliveredMessage], None]
"""Called with the slots that took the delivery (their :meth:`Slots.release` settles its slot)."""


class Slots:
    """Consumers of ``queue`` on one channel, one message each, as many as the target."""

    def __init__(self, queue: str, deliver: Deliver) -> None:
        self.queue = queue
        self._deliver = deliver
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._target = 0
        self._busy: dict[str, int | None] = {}
        """Our consumers on the current channel: tag -> delivery tag of the message it holds, or None."""
        self._held_elsewhere: set[str] = set()
        """Tags no longer ours (cancelled meanwhile) whose message is still being served."""
        self._lock = asyncio.Lock()
        self.on_broker_cancel: Callable[[], None] = lambda: None

    @property
    def target(self) -> int:
        return self._target

    @property
    def channel(self) -> aiormq.abc.AbstractChannel | None:
        return self._channel

    @property
    def consumers(self) -> int:
        return len(self._busy)

    @property
    def used(self) -> int:
        """Slots of the window this queue takes: its consumers, and messages of cancelled ones in service."""
        return len(self._busy) + len(self._held_elsewhere)

    def holding(self) -> int:
        """Messages held: by our consumers and by consumers cancelled while they served one."""
        return sum(held is not None for held in self._busy.values()) + len(self._held_elsewhere)

    async def attach(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Use ``channel`` from now on (new after a reconnect): the old consumers died with theirs."""
        async with self._lock:
            self._channel = channel
            self._busy.clear()
            self._held_elsewhere.clear()
            channel.on_consumer_cancel_callbacks.add(self._on_cancel)
            await channel.basic_qos(prefetch_count=1, global_=False)

    async def resize(self, target: int) -> None:
        """Hold at most ``target`` messages: open consumers, or cancel idle ones (0 stops consuming)."""
        async with self._lock:
            self._target = max(0, target)
            await self._fit()

    async def refill(self) -> None:
        """Open the consumers missing to reach the target (after the broker cancelled some)."""
        async with self._lock:
            await self._fit()

    async def release(self, message: aiormq.abc.DeliveredMessage) -> None:
        """Its message is done and about to be settled: cancel its consumer first if the window shrank."""
        tag, delivery_tag = _tags(message)
        async with self._lock:
            if message.channel is not self._channel:
                return  # a delivery of a channel that is gone
            if tag in self._held_elsewhere:
                self._held_elsewhere.discard(tag)
                await self._fit()
                return
            if self._busy.get(tag) != delivery_tag:
                return  # not ours any more, or already holding its next message
            if self.holding() > self._target:
                del self._busy[tag]
                await self._cancel(tag)
                self._say("one cancelled on release")
            else:
                self._busy[tag] = None

    def delivered(self, message: aiormq.abc.DeliveredMessage) -> None:
        """Record which consumer holds this message now (called for each delivery)."""
        tag, delivery_tag = _tags(message)
        if tag in self._busy:
            self._busy[tag] = delivery_tag
        else:
            self._held_elsewhere.add(tag)  # cancelled by us while this delivery was on its way
            self._say(f"delivery for a consumer not ours: {tag}")

    def _say(self, what: str) -> None:
        log.debug(
            "slots: %s; %d consumers, target %d, holding %d (%d elsewhere)",
            what,
            len(self._busy),
            self._target,
            self.holding(),
            len(self._held_elsewhere),
        )

    async def _fit(self) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        excess = len(self._busy) + len(self._held_elsewhere) - self._target
        if excess > 0:
            for tag in [tag for tag, held in self._busy.items() if held is None][:excess]:
                del self._busy[tag]
                await self._cancel(tag)
            self._say("idle ones cancelled")
            return  # busy consumers are cancelled when their message is done
        for _ in range(-excess):
            # Known before the broker confirms it: its first message may arrive right behind the confirm.
            tag = f"slot-{uuid.uuid4().hex}"
            self._busy[tag] = None
            try:
                await channel.basic_consume(
                    self.queue, self._on_delivery, no_ack=False, consumer_tag=tag, timeout=10
                )
            except BaseException:
                self._busy.pop(tag, None)
                raise
        if excess < 0:
            self._say("opened")

    async def _cancel(self, tag: str) -> None:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*BROKER_GONE):
                await channel.basic_cancel(tag, timeout=10)

    async def _on_delivery(self, message: aiormq.abc.DeliveredMessage) -> None:
        if message.channel is not self._channel:
            return
        self.delivered(message)
        self._deliver(self, message)

    def _on_cancel(self, frame: Basic.Cancel) -> None:
        tag = frame.consumer_tag or ""
        if tag not in self._busy:
            return
        if self._busy.pop(tag) is not None:
            self._held_elsewhere.add(tag)
        log.warning("the broker cancelled a consumer of %s; subscribing again", self.queue)
        self.on_broker_cancel()
