"""The names this consumer serves: every name its vLLM lists, each with its card and its queue.

One vLLM serves its model under several names (the ``--served-model-name``
aliases) and each LoRA adapter under its own (``--lora-modules``, or loaded at
run time); ``/v1/models`` lists them all, adapters with ``parent``. Each name
gets its own model queue (declared like the primary's, :mod:`contract.queues`),
so a client reaches it as it would reach vLLM, and its own
:class:`consumer.slots.Slots` on the worker's one consume channel. The flow
window bounds what the backend runs across all its names: the slots of all
names together never exceed it. They are shared out by demand (what each name
holds and what waits in its queue, read with passive declares at most every
``CONSUMER_NAMES_BALANCE_INTERVAL``), so a busy name never starves another:
a name whose requests wait gets slots as others' are released, and the slots
nobody needs are spread over all names, ready for the next request.

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

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiormq
import aiormq.abc

import contract
from consumer.slots import Deliver, Slots
from contract import queues
from contract.errors import BROKER_GONE

log = logging.getLogger(__name__)

CARD_FIELDS = frozenset({"id", "object", "created", "owned_by", "root", "parent", "max_model_len"})
"""What of vLLM's ``/v1/models`` entry the sender lists (its ``permission`` is vLLM's own business)."""


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


def share(window: int, holding: Mapping[str, int], waiting: Mapping[str, int]) -> dict[str, int]:
    """How many of the window's ``window`` slots each name gets (all names are keys of ``holding``):
    first one by one to the names with demand (what they hold and what waits for them), those
    holding least first, until each has its demand; then what is left one by one to every name.
    With fewer slots than names in demand, the names take turns (whoever holds none comes first).

    Whole rounds are given at once (a round's order only matters when it is the last, partial one):
    this runs after every finished request, so it costs a few steps per name, not one per slot."""
    targets = dict.fromkeys(holding, 0)
    demand = {name: holding[name] + waiting.get(name, 0) for name in targets}
    left = max(0, window)
    while left > 0 and targets:
        wanting = sorted((name for name in targets if targets[name] < demand[name]), key=lambda n: holding[n])
        group = wanting or list(targets)
        rounds = left // len(group)
        if wanting:
            rounds = min(rounds, min(demand[name] - targets[name] for name in wanting))
        if rounds == 0:
            for name in group[:left]:
                targets[name] += 1
            break
        for name in group:
            targets[name] += rounds
        left -= rounds * len(group)
    return targets


class ServedNames:
    """The names, their queues and their slots; the flow window is shared out among them."""

    def __init__(
        self, primary: str, max_priority: int, deliver: Deliver, on_broker_cancel: Callable[[], None]
    ) -> None:
        self.primary = primary
        self.cards: dict[str, dict[str, Any]] = {primary: {"id": primary}}
        self.slots: dict[str, Slots] = {}
        self._max_priority = max_priority
        self._deliver = deliver
        self._on_broker_cancel = on_broker_cancel
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._depth_channel: aiormq.abc.AbstractChannel | None = None
        self._window = 0
        self._retired: list[Slots] = []
        """Slots of names no longer served, until the messages they hold are done (counted in the window)."""
        self._waiting: dict[str, int] = {}
        self._waiting_read_at = -float("inf")
        self._lock = asyncio.Lock()
        self.queue_type = queues.QueueType.CLASSIC
        self.fixed_type = False
        self._add(primary)

    def _add(self, name: str) -> Slots:
        slots = self.slots[name] = Slots(contract.model_queue(name), self._deliver)
        slots.on_broker_cancel = self._on_broker_cancel
        return slots

    async def declare(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Declare every name's queue (again after a reconnect or a failover); the primary's type
        (``queue_type``, chosen by the worker) is the one the others are declared with."""
        self._connection = connection
        for name in list(self.slots):
            await self._declare(name)

    async def _declare(self, name: str) -> None:
        assert self._connection is not None
        try:
            declared = await queues.declare(
                self._connection,
                contract.model_queue(name),
                queues.model_queue_choices(self._max_priority),
                self.queue_type,
                fixed=self.fixed_type,
            )
        except queues.QueueTypeMismatch as exc:
            # A queue keeps the arguments it was first declared with (e.g. x-max-priority 9, from
            # before the fair-share sub-levels): say what to do rather than fail unexplained.
            raise RuntimeError(
                f"{exc}. It exists with other arguments (an older version, another type or another "
                "CONSUMER_MAX_PRIORITY): recreate it as rabbitmq/README.md says (Upgrading)"
            ) from exc
        if name == self.primary:
            self.queue_type = declared

    async def attach(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Consume on ``channel`` from now on (new after a reconnect): every name's slots."""
        self._channel = channel
        for slots in list(self.slots.values()):
            if slots.channel is not channel:
                await slots.attach(channel)

    @property
    def channel(self) -> aiormq.abc.AbstractChannel | None:
        return self._channel

    @property
    def sharing(self) -> bool:
        """Whether the window is shared (several names, or retired ones still finishing): only then
        must a finished request move slots between names."""
        return len(self.slots) > 1 or bool(self._retired)

    async def distribute(self, window: int, *, depths_every: float = 0.0) -> None:
        """Hold at most ``window`` messages across all names (0 stops consuming), shared by demand.

        Names losing slots give them up first (idle ones at once, busy ones when their message is
        done); names gaining slots then get only what is free, so the slots open on the channel
        never outnumber the window."""
        async with self._lock:
            self._window = max(0, window)
            names = list(self.slots)
            holding = {name: self.slots[name].holding() for name in names}
            if len(names) > 1 and self._window and time.monotonic() - self._waiting_read_at >= depths_every:
                self._waiting = await self._depths()
                self._waiting_read_at = time.monotonic()
            targets = share(self._window, holding, self._waiting if len(names) > 1 else {})
            for name, target in targets.items():
                slots = self.slots[name]
                if target < slots.target or target < slots.used:
                    await slots.resize(min(target, slots.used))
            for slots in [slots for slots in self._retired if not slots.holding()]:
                self._retired.remove(slots)
                if slots.queue not in {served.queue for served in self.slots.values()}:
                    await self._delete_if_idle(slots.queue)
            free = self._window - sum(slots.used for slots in self.slots.values())
            free -= sum(slots.holding() for slots in self._retired)
            for name, target in targets.items():
                slots = self.slots[name]
                if target > slots.target or target > slots.used:
                    grow = min(target, slots.used + max(0, free))
                    free -= max(0, grow - slots.used)
                    await slots.resize(grow)

    async def _depths(self) -> dict[str, int]:
        """Requests waiting in each name's queue (passive declares on a channel of their own)."""
        if self._connection is None or self._connection.is_closed:
            return {}
        depths: dict[str, int] = {}
        for name in list(self.slots):
            channel = self._depth_channel
            if channel is None or channel.is_closed:
                channel = self._depth_channel = await self._connection.channel(publisher_confirms=False)
            try:
                ok = await channel.queue_declare(contract.model_queue(name), passive=True, timeout=5)
            except aiormq.exceptions.ChannelNotFoundEntity:
                # Deleted meanwhile (by a replica whose backend unloaded the name while this one held
                # no slot on it): still served here, so declared again.
                await self._declare(name)
                continue
            depths[name] = ok.message_count or 0
        return depths

    async def follow(self, cards: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
        """Serve exactly ``cards``' names from now on; the names (added, removed)."""
        async with self._lock:
            added = [name for name in cards if name not in self.cards]
            removed = [name for name in self.cards if name not in cards and name != self.primary]
            self.cards[self.primary] = cards.get(self.primary, self.cards[self.primary])
            for name in added:
                slots = self._add(name)
                try:
                    if self._connection is not None:
                        await self._declare(name)
                    if self._channel is not None:
                        await slots.attach(self._channel)
                except BaseException:
                    del self.slots[name]  # not served: tried again at the next reading
                    raise
                self.cards[name] = cards[name]
            for name in removed:
                self.cards.pop(name, None)
                slots = self.slots.pop(name)
                self._retired.append(slots)
                with contextlib.suppress(*BROKER_GONE):
                    await slots.resize(0)
                if not slots.holding():
                    self._retired.remove(slots)
                    await self._delete_if_idle(slots.queue)
            kept = {name: self.cards[name] for name in cards if name in self.cards and name != self.primary}
            self.cards = {self.primary: self.cards[self.primary], **kept}
        if added or removed:
            await self.distribute(self._window)
        return added, removed

    async def _delete_if_idle(self, queue: str) -> None:
        """Delete the queue of a name the backend no longer serves, unless requests wait in it or
        another consumer takes it (then the broker refuses, on a channel of its own: a refusal closes it)."""
        if self._connection is None or self._connection.is_closed:
            return
        try:
            channel = await self._connection.channel(publisher_confirms=False)
        except BROKER_GONE as exc:
            log.warning("could not delete the queue %s: %s", queue, exc)
            return
        try:
            await channel.queue_delete(queue, if_unused=True, if_empty=True, timeout=10)
        except aiormq.exceptions.ChannelPreconditionFailed:
            log.info("queue %s kept: requests wait in it or another consumer serves it", queue)
        except BROKER_GONE as exc:
            log.warning("could not delete the queue %s: %s", queue, exc)
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
