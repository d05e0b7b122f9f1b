"""Which models are served right now, learned from the consumers' announcements, and which sleep.

Consumers announce themselves every few seconds and whenever their state
changes; an announcement is believed for its ``ttl``. A model is listed while
at least one of its consumers is ``ready``, and so is every configured model
(``SENDER_MODELS``) whatever its state, so that a UI can offer a sleeping
model, whose first request wakes it up. Each entry says its ``status``, a
field OpenAI clients ignore: ``ready`` (a consumer takes requests), ``starting``
(none does yet, but a consumer is connected or requests wait for one: the model
is being woken up) or ``sleeping``. No management API is involved.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import contract
from contract import Announcement, ContractError

log = logging.getLogger(__name__)


READY = "ready"
STARTING = "starting"
SLEEPING = "sleeping"


class ModelRegistry:
    def __init__(self, max_priority: int, configured: tuple[str, ...] = ()) -> None:
        self._consumers: dict[str, dict[str, tuple[float, Announcement]]] = {}
        self._max_priority = max_priority
        self.configured = configured
        self._last_cards: dict[str, dict[str, Any]] = {}
        """The last card a consumer announced for each configured model, shown while it sleeps."""
        self._wire_max = contract.wire_max_priority(max_priority)
        self._mismatched: set[str] = set()
        """Consumers already reported for declaring another priority scale (said once each)."""

    def receive(self, body: bytes) -> None:
        try:
            announcement = Announcement.decode(body)
        except ContractError as exc:
            log.warning("ignored announcement: %s", exc)
            return
        self._check_scale(announcement)
        consumers = self._consumers.setdefault(announcement.model, {})
        if announcement.state == Announcement.GONE:
            consumers.pop(announcement.consumer_id, None)
        else:
            consumers[announcement.consumer_id] = (time.monotonic() + announcement.ttl, announcement)
            if announcement.model in self.configured:
                self._last_cards[announcement.model] = announcement.card

    def _check_scale(self, announcement: Announcement) -> None:
        """Both services clamp priorities to their own scale: a mismatch silently flattens the top
        levels (or makes them refused by the queue), so it is said loudly, once per consumer."""
        if announcement.max_priority == self._wire_max or announcement.consumer_id in self._mismatched:
            return
        if len(self._mismatched) < 10_000:
            self._mismatched.add(announcement.consumer_id)
        log.error(
            "consumer %s of model %s declared its queue with message priorities 0-%d, this sender "
            "publishes 0-%d (SENDER_MAX_PRIORITY %d with fair-share sub-levels): set "
            "CONSUMER_MAX_PRIORITY and SENDER_MAX_PRIORITY alike and run the same version on both sides",
            announcement.consumer_id,
            announcement.model,
            announcement.max_priority,
            self._wire_max,
            self._max_priority,
        )

    def card(self, model: str, *, waiting: bool = False) -> dict[str, Any] | None:
        """The OpenAI model object for ``model``, with its ``status``, if a live consumer serves it
        or it is configured; ``waiting``: requests wait in its queue."""
        now = time.monotonic()
        connected = False
        for expires, announcement in self._consumers.get(model, {}).values():
            if expires > now:
                if announcement.state == Announcement.READY:
                    return _model_object(model, announcement.card, READY)
                connected = True
        if model not in self.configured:
            return None
        status = STARTING if connected or waiting else SLEEPING
        return _model_object(model, self._last_cards.get(model, {}), status)

    def shared(self, model: str) -> bool:
        """Whether a live consumer ready for ``model`` shares its flow window with other names: its
        queue may have no consumer for a moment, the request is still taken (contract.Announcement)."""
        now = time.monotonic()
        return any(
            expires > now and announcement.state == Announcement.READY and announcement.shared
            for expires, announcement in self._consumers.get(model, {}).values()
        )

    def asleep(self, model: str) -> bool:
        """Whether no live consumer of ``model`` is ready (its card's status is not ``ready``)."""
        card = self.card(model)
        return card is None or card["status"] != READY

    def max_model_len(self, model: str) -> int | None:
        """The model's context length as its backend reports it, if a live consumer serves it."""
        card = self.card(model)
        value = card.get("max_model_len") if card is not None else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def cards(self, waiting: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """Every model served or configured, by name; ``waiting``: models whose queue holds requests."""
        models = sorted({*self._consumers, *self.configured})
        listed = (self.card(model, waiting=model in waiting) for model in models)
        return [card for card in listed if card is not None]


def _model_object(model: str, card: dict[str, Any], status: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"object": "model", "created": 0, "owned_by": "dispatcher"}
    entry.update(card)
    entry["id"] = model
    entry["status"] = status
    return entry
