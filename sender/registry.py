"""Which models are served right now, learned from the consumers' announcements.

Consumers announce themselves every few seconds and whenever their state
changes; an announcement is believed for its ``ttl``. A model is listed while
at least one of its consumers is ``ready``. No management API is involved.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from contract import Announcement, ContractError

log = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self) -> None:
        self._consumers: dict[str, dict[str, tuple[float, Announcement]]] = {}

    def receive(self, body: bytes) -> None:
        try:
            announcement = Announcement.decode(body)
        except ContractError as exc:
            log.warning("ignored announcement: %s", exc)
            return
        consumers = self._consumers.setdefault(announcement.model, {})
        if announcement.state == Announcement.GONE:
            consumers.pop(announcement.consumer_id, None)
        else:
            consumers[announcement.consumer_id] = (time.monotonic() + announcement.ttl, announcement)

    def known(self, model: str) -> bool:
        """Whether any consumer ever announced ``model`` to this sender."""
        return model in self._consumers

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
