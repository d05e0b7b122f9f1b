"""Which kind of queue each of our durable queues is, and the arguments that follow: one place for both sides.

RabbitMQ 4.3 made quorum queues deliver in strict priority order (levels
0-31, FIFO within a level) while replicating them on several nodes (Raft).
So on 4.3 and later, model queues are quorum queues: a node lost does not take
a model down, and the backlog survives it in priority order. Older brokers
(3.x, 4.0-4.2) have only two ratio-based quorum levels, so there model queues
stay classic queues with ``x-max-priority``.

The type is chosen from the broker's version (the ``version`` the server
announces when a connection opens) unless a setting fixes it
(``SENDER_QUEUE_TYPE`` / ``CONSUMER_QUEUE_TYPE``: ``auto``, ``quorum``,
``classic``). The same type applies to every durable queue a process owns:

- model queues: quorum without ``x-max-priority`` (4.3 refuses the argument;
  priorities are always on), or classic with ``x-max-priority``. Both carry the
  wire priorities of :mod:`contract.names` (each user level 0 to ``max_priority``
  split in fair-share sub-levels: 0-29 for the default scale 0-9), which fit the
  quorum levels 0-31 whenever the scale has at most 32 levels; a larger scale
  needs classic queues.
- the dead-letter queue: a quorum queue keeps what it holds through a node loss.
- a sender's reply queue: a quorum queue with ``x-expires`` (allowed on quorum
  queues). A classic one lives on the node its sender first connected to: with
  that node gone, the sender could neither consume nor redeclare it, and the
  replies in flight would be stranded there. Replicated, it keeps taking
  replies while its sender reconnects to another node, and still expires once
  the sender is gone for good.

A queue that already exists with the other type wins when the type is
``auto`` (e.g. a classic model queue made before the broker was upgraded to
4.3: redeclaring it as quorum is refused, and it keeps serving as it is until
it is drained and deleted); with a type fixed by the setting, the mismatch is
an error that says so.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

import aiormq
import aiormq.abc

from contract.names import DEFAULT_MAX_PRIORITY, wire_max_priority

log = logging.getLogger(__name__)

QueueTypeSetting = Literal["auto", "quorum", "classic"]
"""The value of ``SENDER_QUEUE_TYPE`` / ``CONSUMER_QUEUE_TYPE``."""

QUORUM_PRIORITIES_SINCE = (4, 3)
"""First RabbitMQ release whose quorum queues deliver in strict priority order over many levels."""
QUORUM_MAX_PRIORITY = 31
"""Highest distinct quorum priority level; higher priorities count as this one."""
CONSUMER_DISCONNECTED_TIMEOUT_MS = 5_000
"""How long a quorum model queue keeps the requests held by a consumer whose node it cannot reach
before handing them to another consumer. RabbitMQ's default (60 s) is meant for a short network
partition; a consumer on a killed node does not come back, and its requests would sit out their
deadline. After a real partition the first answer wins (the sender ignores a second one)."""
REPLY_CONSUMER_DISCONNECTED_TIMEOUT_MS = 0
"""The same for a sender's quorum reply queue: its only consumer is its own sender, which, when its
node was killed, subscribes again from another node at once. The reply pieces the dead subscription
held unacked are handed to the new one right away instead of after RabbitMQ's default 60 s (a
sender that was only partitioned away drops the second copies it may get, by their ``seq``)."""


class QueueType(enum.Enum):
    CLASSIC = "classic"
    QUORUM = "quorum"


def parse_version(version: object) -> tuple[int, int] | None:
    """``(major, minor)`` of a RabbitMQ version string (``"4.3.6"``, ``b"3.10.8"``); None if unreadable."""
    text = version.decode(errors="replace") if isinstance(version, bytes) else str(version)
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def server_version(connection: aiormq.abc.AbstractConnection) -> tuple[int, int] | None:
    """The broker's version, as it announced itself on ``connection``."""
    properties: Mapping[str, Any] = getattr(connection, "server_properties", None) or {}
    return parse_version(properties.get("version", ""))


def choose(
    setting: QueueTypeSetting, version: tuple[int, int] | None, max_priority: int = DEFAULT_MAX_PRIORITY
) -> QueueType:
    """The queue type to use: the setting's, or, with ``auto``, quorum from 4.3 on (if the scale fits)."""
    if setting != "auto":
        return QueueType(setting)
    fits = wire_max_priority(max_priority) <= QUORUM_MAX_PRIORITY
    if version is not None and version >= QUORUM_PRIORITIES_SINCE and fits:
        return QueueType.QUORUM
    return QueueType.CLASSIC


def model_queue_arguments(queue_type: QueueType, max_priority: int = DEFAULT_MAX_PRIORITY) -> dict[str, Any]:
    """Arguments every declaration of a model queue of this type must use (they must match)."""
    if queue_type is QueueType.QUORUM:
        if wire_max_priority(max_priority) > QUORUM_MAX_PRIORITY:
            raise ValueError(
                f"a priority scale up to {max_priority} does not fit quorum queues (levels 0-"
                f"{QUORUM_MAX_PRIORITY}): lower the max priority or use classic queues"
            )
        return {"x-queue-type": "quorum", "x-consumer-disconnected-timeout": CONSUMER_DISCONNECTED_TIMEOUT_MS}
    return {"x-max-priority": wire_max_priority(max_priority)}


def model_queue_choices(max_priority: int = DEFAULT_MAX_PRIORITY) -> dict[QueueType, dict[str, Any]]:
    """The arguments of a model queue for each type that can hold the priority scale."""
    if wire_max_priority(max_priority) > QUORUM_MAX_PRIORITY:
        return {QueueType.CLASSIC: model_queue_arguments(QueueType.CLASSIC, max_priority)}
    return {kind: model_queue_arguments(kind, max_priority) for kind in QueueType}


def dead_letter_queue_arguments(queue_type: QueueType) -> dict[str, Any]:
    """Arguments of the dead-letter queue (a classic one names no type, as it always was declared)."""
    return {"x-queue-type": "quorum"} if queue_type is QueueType.QUORUM else {}


def reply_queue_arguments(queue_type: QueueType, expires_ms: int) -> dict[str, Any]:
    """Arguments of a sender's reply queue: removed ``expires_ms`` after its sender is gone."""
    arguments: dict[str, Any] = {"x-expires": expires_ms}
    if queue_type is QueueType.QUORUM:
        arguments["x-queue-type"] = "quorum"
        arguments["x-consumer-disconnected-timeout"] = REPLY_CONSUMER_DISCONNECTED_TIMEOUT_MS
    return arguments


class QueueTypeMismatch(RuntimeError):
    """The queue exists with another type than the one the setting demands."""


async def declare(
    connection: aiormq.abc.AbstractConnection,
    name: str,
    arguments: Mapping[QueueType, dict[str, Any]],
    preferred: QueueType,
    *,
    fixed: bool,
) -> QueueType:
    """Declare the durable queue ``name`` with ``arguments[preferred]``, and return its type.

    Each try runs on a plain channel of its own, opened for it (the broker closes
    a channel on a refused declare, and a robust channel would reopen itself and
    remember the queue). Unless ``fixed``, a queue that exists with the other
    type is declared as it is.
    """
    if preferred not in arguments:
        raise QueueTypeMismatch(f"queue {name} cannot be a {preferred.value} queue (see contract/queues.py)")
    order = [preferred] if fixed else [preferred, *[kind for kind in arguments if kind is not preferred]]
    refusal: Exception | None = None
    for queue_type in order:
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.queue_declare(name, durable=True, arguments=arguments[queue_type], timeout=10)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            refusal = exc
            continue
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
        if queue_type is not preferred:
            log.warning(
                "queue %s already exists as a %s queue; using it as such (a %s queue is wanted: "
                "drain and delete it to change its type)",
                name,
                queue_type.value,
                preferred.value,
            )
        return queue_type
    raise QueueTypeMismatch(f"queue {name} cannot be declared as a {preferred.value} queue: {refusal}")
