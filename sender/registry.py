"""Which models are served right now, learned from the consumers' announcements.

Consumers announce themselves every few seconds and whenever their state
changes; an announcement is believed for its ``ttl``. A model is listed while
at least one of its consumers is ``ready``. No management API is involved.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import contract
from contract import Announcement, ContractError

log = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, max_priority: int) -> None:
        self._consumers: dict[str, dict[str, tuple[float, Announcement]]] = {}
        self._max_priority = max_priority
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

    def card(self, model: str) -> dict[str, Any] | None:
        """The OpenAI model object for ``model`` if a live consumer serves it."""
        now = time.monotonic()
        for expires, announcement in self._consumers.get(model, {}).values():
            if expires > now and announcement.state == Announcement.READY:
                return _model_object(model, announcement.card)
        return None

    def cards(self) -> list[dict[str, Any]]:
        listed = (self.card(model) for model in sorted(self._consumers))
        return [card for card in listed if card is not None]


def _model_object(model: str, card: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"object": "model", "created": 0, "owned_by": "dispatcher"}
    entry.update(card)
    entry["id"] = model
    return entry
