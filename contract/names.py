"""Names and scales both sides must agree on: queues, exchange, routing keys, priority, version."""

from __future__ import annotations

import re

VERSION = 1
"""Header ``v`` of every request; a consumer refuses other versions."""

QUEUE_PREFIX = "dispatch.model."
CONTROL_EXCHANGE = "dispatch.control"
ANNOUNCE_KEY = "announce"
ROLLCALL_KEY = "rollcall"
CANCEL_KEY = "cancel"
REPLY_QUEUE_PREFIX = "dispatch.reply."
REPLY_QUEUE_EXPIRES_MS = 60_000
"""A sender's reply queue outlives a reconnect, and is removed this long after its sender is gone."""
DEAD_LETTER_QUEUE = "dispatch.dead-letter"
"""Default durable queue where consumers put request messages they cannot read, instead of dropping them."""

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
"""Where both services look for the broker unless ``RABBITMQ_URL`` says otherwise."""

DEFAULT_MAX_PRIORITY = 9
"""Top of the priority scale (0 lowest): ``SENDER_MAX_PRIORITY`` and ``CONSUMER_MAX_PRIORITY``
default to it, and a sender warns about a consumer that announces another."""


def model_queue(model: str) -> str:
    """Name of the durable queue that holds the requests for ``model``."""
    return QUEUE_PREFIX + model


_QUEUE_NAME = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]*")


def servable_model_name(model: str) -> bool:
    """Whether ``model`` can name a queue at all (letters, digits, ``-_.:@#,/+`` and space, 255 bytes).

    A name that cannot is a model no consumer can serve: the sender answers 404 without asking
    the broker.
    """
    return len(QUEUE_PREFIX) + len(model) <= 255 and _QUEUE_NAME.fullmatch(model) is not None
