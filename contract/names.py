"""Names and scales both sides must agree on: queues, exchange, routing keys, priority, version."""

from __future__ import annotations

import re
from typing import Any

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
CANCEL_STREAM = "dispatch.cancellations"
"""Durable stream bound to the control exchange's ``cancel`` key: every cancellation, kept so that a
consumer that starts later (a model woken from zero) learns of the requests whose clients left."""
CANCEL_STREAM_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-age": "1h",
    "x-max-length-bytes": 64 * 1024 * 1024,
    "x-stream-max-segment-size-bytes": 4 * 1024 * 1024,
}
"""Bounded by age (an hour: the model queues' ``message-ttl``, longer than any request waits) and by
size (64 MiB, some 300,000 cancellations); retention drops whole segments, hence small ones."""
DEAD_LETTER_QUEUE = "dispatch.dead-letter"
"""Default durable queue where consumers put request messages they cannot read, instead of dropping them."""

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
"""Where both services look for the broker unless ``RABBITMQ_URL`` says otherwise."""

DEFAULT_MAX_PRIORITY = 9
"""Top of the user-visible priority scale (0 lowest): ``SENDER_MAX_PRIORITY`` and
``CONSUMER_MAX_PRIORITY`` default to it, and a sender warns about a consumer that announces another."""

WIRE_PRIORITY_CEILING = 31
"""The highest message priority a quorum queue tells apart (RabbitMQ 4.3: strict levels 0-31, anything
above counts as 31). The wire stays at or under it whenever the user scale allows, so the same
messages keep their order on a quorum queue and on a classic ``x-max-priority`` queue."""

DEFAULT_BROKER_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
"""RabbitMQ's own ``max_message_size`` default since 4.0 (3.x: 128 MiB), which ``rabbitmq/rabbitmq.conf``
states: what both services assume unless told (``*_BROKER_MAX_MESSAGE_SIZE``)."""
MESSAGE_ENVELOPE_BYTES = 64 * 1024
"""Room kept, besides a message's body, for its headers and properties. RabbitMQ 3.10 and 4.3 count
only the body against ``max_message_size`` (measured: a 1 MiB body with 100 KB of headers passes a
1 MiB limit, 1 MiB + 1 byte does not); the margin stays in case a release or a protocol counts the
properties too (a request's headers are well under 1 KiB)."""


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


def fairness_sublevels(max_priority: int = DEFAULT_MAX_PRIORITY) -> int:
    """Wire levels inside each user level, spent on fair share between tokens of that level.

    As many as fit under :data:`WIRE_PRIORITY_CEILING`: 3 for the default scale 0-9 (wire 0-29),
    8 for a scale 0-3, 1 (no fair share) for a scale of 16 levels or more.
    """
    return max(1, (WIRE_PRIORITY_CEILING + 1) // (max(0, max_priority) + 1))


def wire_max_priority(max_priority: int = DEFAULT_MAX_PRIORITY) -> int:
    """The highest priority a request message carries on a user scale of 0 to ``max_priority``:
    the classic model queue's ``x-max-priority``, and what a consumer announces."""
    return (max(0, max_priority) + 1) * fairness_sublevels(max_priority) - 1


def wire_priority(level: int, demotion: int, max_priority: int = DEFAULT_MAX_PRIORITY) -> int:
    """The message priority of a request at user ``level``, pushed ``demotion`` sub-levels down.

    Every sub-level of a level sits above every sub-level of the level under it: strict priority
    between user levels is untouched, and fair share only reorders requests of one level.
    """
    sublevels = fairness_sublevels(max_priority)
    level = max(0, min(level, max_priority))
    demotion = max(0, min(demotion, sublevels - 1))
    return level * sublevels + (sublevels - 1 - demotion)


def user_level(wire: int, max_priority: int = DEFAULT_MAX_PRIORITY) -> int:
    """The user level a message priority belongs to (for logs, metrics and the backend's priority)."""
    return max(0, min(wire // fairness_sublevels(max_priority), max_priority))


def demotion_for_backlog(backlog: int, max_priority: int = DEFAULT_MAX_PRIORITY) -> int:
    """How many sub-levels down a token's new request goes when ``backlog`` of its requests already
    wait: none for the first, one for the second, then one more each time the backlog doubles
    (1, 2-3, 4-7, ...), down to the level's bottom. Requests of a token that has nothing waiting
    thus overtake the waiting backlog of a token that has many, within one user level."""
    return min(fairness_sublevels(max_priority) - 1, max(0, backlog).bit_length())
