"""Which models ``/v1/models`` shows, in which state, and how ``SENDER_MODELS`` is read (no service)."""

from __future__ import annotations

import pytest

from contract import Announcement
from sender.registry import ModelRegistry
from sender.settings import SenderSettings


def announce(registry: ModelRegistry, model: str, state: str, consumer: str = "c1") -> None:
    card = {"id": model, "max_model_len": 4096}
    registry.receive(Announcement(consumer, model, state, ttl=60, card=card).encode())


def statuses(registry: ModelRegistry, waiting: frozenset[str] = frozenset()) -> dict[str, str]:
    return {card["id"]: card["status"] for card in registry.cards(waiting)}


def test_configured_models_are_listed_in_every_state() -> None:
    registry = ModelRegistry(9, ("asleep", "woken", "waking"))
    assert statuses(registry) == {"asleep": "sleeping", "woken": "sleeping", "waking": "sleeping"}
    assert statuses(registry, frozenset({"waking"}))["waking"] == "starting"  # a request waits
    announce(registry, "woken", Announcement.READY)
    announce(registry, "waking", Announcement.PAUSED)  # connected, its backend not ready
    announce(registry, "elsewhere", Announcement.READY)  # not configured, but served: listed
    announce(registry, "gone", Announcement.PAUSED)  # not configured, not served: not listed
    assert statuses(registry) == {
        "asleep": "sleeping",
        "elsewhere": "ready",
        "waking": "starting",
        "woken": "ready",
    }
    assert registry.asleep("asleep") and not registry.asleep("woken")


def test_a_sleeping_model_keeps_the_card_it_last_announced() -> None:
    registry = ModelRegistry(9, ("m",))
    assert registry.card("m") == {
        "object": "model",
        "created": 0,
        "owned_by": "dispatcher",
        "id": "m",
        "status": "sleeping",
    }
    announce(registry, "m", Announcement.READY)
    announce(registry, "m", Announcement.GONE)
    card = registry.card("m")
    assert card is not None and card["status"] == "sleeping" and card["max_model_len"] == 4096
    assert registry.card("unconfigured") is None


def test_sender_models_are_read_once_each_and_checked() -> None:
    assert SenderSettings(models=" a, b ,,a,c:1 ").configured_models() == ("a", "b", "c:1")
    assert SenderSettings().configured_models() == ()
    with pytest.raises(ValueError, match="cannot name a model queue"):
        SenderSettings(models="ok,b\u00e4d")
