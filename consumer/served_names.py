"""The names this consumer serves: every name its vLLM lists, each with its card and its queue.

One vLLM serves its model under several names (the ``--served-model-name``
aliases) and each LoRA adapter under its own (``--lora-modules``, or loaded at
run time); ``/v1/models`` lists them all, adapters with ``parent``. Each name
gets its own model queue, so a client reaches it as it would reach vLLM, and
all of them are consumed on the worker's one consume channel: the channel-wide
prefetch (the flow window) then bounds what the backend runs across all its
names, whichever queue a request came from.

``MODEL`` stays the primary name: it is served whatever the backend lists.
The other names are taken from the backend only when it lists ``MODEL``
(a backend that does not is one that answers under any name, as the
consumer always allowed). The worker re-reads the list now and then
(``CONSUMER_NAMES_INTERVAL``): an adapter loaded at run time gets a queue, one
unloaded loses its subscription, and its queue is deleted if nothing waits in
it and nobody else consumes it (a request for it is then refused with 404,
as vLLM would).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

import contract
from contract.errors import BROKER_GONE

log = logging.getLogger(__name__)

CARD_FIELDS = frozenset({"id", "object", "created", "owned_by", "root", "parent", "max_model_len"})
"""What of vLLM's ``/v1/models`` entry the sender lists (its ``permission`` is vLLM's own business)."""

OnMessage = Callable[[AbstractIncomingMessage], Awaitable[None]]


def cards_from(entries: list[Any], primary: str, *, discover: bool = True) -> dict[str, dict[str, Any]]:
    """Each served name and its card, the primary first. If the backend does not list ``primary``,
    its first entry is the primary's card (renamed) and nothing else is served."""
    by_name = {
        entry["id"]: {key: value for key, value in entry.items() if key in CARD_FIELDS}
        for entry in entries
        if isinstance(entry, dict)
        and isinstance(entry.get("id"), str)
        and contract.servable_model_name(entry["id"])
    }
    if primary not in by_name:
        first = next(iter(by_name.values()), {})
        return {primary: {**first, "id": primary}}
    if not discover:
        return {primary: by_name[primary]}
    return {primary: by_name.pop(primary), **by_name}


class ServedNames:
    """The names, their queues and their subscriptions; consumption starts and stops for all at once."""

    def __init__(self, primary: str, max_priority: int) -> None:
        self.primary = primary
        self.cards: dict[str, dict[str, Any]] = {primary: {"id": primary}}
        self._max_priority = max_priority
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queues: dict[str, AbstractQueue] = {}
        self._tags: dict[str, str] = {}
        self._on_message: OnMessage | None = None

    @property
    def consuming(self) -> bool:
        return self._on_message is not None

    async def declare(self, connection: AbstractRobustConnection, channel: AbstractChannel) -> None:
        """Declare every name's queue on ``channel``, the one whose prefetch is the flow window."""
        self._connection, self._channel = connection, channel
        for name in self.cards:
            await self._declare(name)

    async def start(self, on_message: OnMessage) -> None:
        """Consume every name's queue (one consumer each, all on the one channel)."""
        self._on_message = on_message
        for name in self._queues:
            await self._consume(name)

    async def stop(self) -> None:
        """Stop taking requests under every name; those delivered finish."""
        self._on_message = None
        for name in list(self._tags):
            await self._cancel(name)

    async def follow(self, cards: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
        """Serve exactly ``cards``' names from now on; the names (added, removed)."""
        added = [name for name in cards if name not in self.cards]
        removed = [name for name in self.cards if name not in cards and name != self.primary]
        self.cards = {**cards, self.primary: cards.get(self.primary, self.cards[self.primary])}
        for name in added:
            if self._channel is not None:
                await self._declare(name)
                if self._on_message is not None:
                    await self._consume(name)
        for name in removed:
            self.cards.pop(name, None)
            await self._cancel(name)
            self._queues.pop(name, None)
            self._forget(name)
            await self._delete_if_idle(name)
        return added, removed

    async def _declare(self, name: str) -> None:
        assert self._channel is not None
        queue, arguments = contract.model_queue(name), contract.model_queue_arguments(self._max_priority)
        try:
            self._queues[name] = await self._channel.declare_queue(queue, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # A queue keeps the arguments it was first declared with (e.g. x-max-priority 9, from
            # before the fair-share sub-levels): say what to do rather than fail unexplained.
            raise RuntimeError(
                f"the broker refused to declare {queue} with {arguments}: it exists with other "
                "arguments (an older version, or another CONSUMER_MAX_PRIORITY). Recreate it as "
                f"rabbitmq/README.md says (Upgrading): {exc}"
            ) from exc

    async def _consume(self, name: str) -> None:
        queue = self._queues.get(name)
        if queue is not None and name not in self._tags and self._on_message is not None:
            self._tags[name] = await queue.consume(self._on_message)

    async def _cancel(self, name: str) -> None:
        tag = self._tags.pop(name, None)
        queue = self._queues.get(name)
        if tag is not None and queue is not None:
            with contextlib.suppress(*BROKER_GONE):
                await queue.cancel(tag)

    def _forget(self, name: str) -> None:
        """aio-pika's robust channel declares again, after a reconnect, every queue it ever declared:
        a name no longer served must not come back (its queue would turn the 404 into a 503)."""
        registry = getattr(self._channel, "_queues", None)
        if isinstance(registry, dict):
            registry.pop(contract.model_queue(name), None)

    async def _delete_if_idle(self, name: str) -> None:
        """Delete the queue of a name the backend no longer serves, unless requests wait in it or
        another consumer takes it (then the broker refuses, on a channel of its own: a refusal closes it)."""
        if self._connection is None:
            return
        try:
            async with self._connection.channel() as channel:
                await channel.queue_delete(contract.model_queue(name), if_unused=True, if_empty=True)
        except aiormq.exceptions.ChannelPreconditionFailed:
            log.info("queue of %s kept: requests wait in it or another consumer serves it", name)
        except BROKER_GONE as exc:
            log.warning("could not delete the queue of %s: %s", name, exc)
