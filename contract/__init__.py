"""The message contract between the sender and the consumers.

Everything that travels through RabbitMQ is defined here, so the two sides
cannot drift apart. ``docs/protocol.md`` describes the same contract in prose.

Requests go to one durable priority queue per model (:func:`model_queue`).
Replies go to the ``reply_to`` queue of the sender that asked, as one or more
messages with the request's ``correlation_id``, numbered from 0; the last one
says so. Consumers announce themselves on the control exchange so senders can
list the models that are being served right now; senders cancel, on the same
exchange, requests whose client went away.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

VERSION = 1

QUEUE_PREFIX = "dispatch.model."
CONTROL_EXCHANGE = "dispatch.control"
ANNOUNCE_KEY = "announce"
ROLLCALL_KEY = "rollcall"
CANCEL_KEY = "cancel"
REPLY_QUEUE_PREFIX = "dispatch.reply."
DEAD_LETTER_QUEUE = "dispatch.dead-letter"
"""Default durable queue where consumers put request messages they cannot read, instead of dropping them."""

DEFAULT_MAX_PRIORITY = 9

# Header names. Short, because they travel with every message.
H_VERSION = "v"
H_PATH = "path"
H_STREAM = "stream"
H_DEADLINE = "deadline"
H_REQUEST_ID = "request-id"
H_SENT = "sent"
H_SEQ = "seq"
H_LAST = "last"
H_STATUS = "status"
H_ERROR = "error"
H_PROMPT_TOKENS = "prompt-tokens"
H_COMPLETION_TOKENS = "completion-tokens"
H_QUEUE_MS = "queue-ms"
H_CONSUMER = "consumer"
H_REJECTED = "rejected"

REQUEST_TYPE = "request"
REPLY_TYPE = "reply"
CANCEL_TYPE = "cancel"


class ContractError(ValueError):
    """A message on a dispatch queue does not follow this contract."""


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


def model_queue_arguments(max_priority: int = DEFAULT_MAX_PRIORITY) -> dict[str, Any]:
    """Arguments every declaration of a model queue must use (they must match)."""
    return {"x-max-priority": max_priority}


@dataclass(frozen=True, slots=True)
class Request:
    """One client request, as the sender publishes it to a model queue."""

    path: str
    body: bytes
    stream: bool
    priority: int
    deadline: float
    """Unix time in seconds after which nobody waits for the answer."""
    request_id: str
    sent: float = 0.0
    """Unix time in seconds the sender published it (0 if unknown): the queue wait starts there."""

    def headers(self) -> dict[str, Any]:
        return {
            H_VERSION: VERSION,
            H_PATH: self.path,
            H_STREAM: self.stream,
            H_DEADLINE: int(self.deadline * 1000),
            H_REQUEST_ID: self.request_id,
            H_SENT: int((self.sent or time.time()) * 1000),
        }

    def ttl_ms(self, now: float | None = None) -> int:
        """Milliseconds left before the deadline, for the AMQP ``expiration``."""
        remaining = self.deadline - (time.time() if now is None else now)
        return max(1, int(remaining * 1000))

    @classmethod
    def from_amqp(cls, headers: dict[str, Any] | None, body: bytes, priority: int | None) -> Request:
        """Decode a request; raise :class:`ContractError` when it is malformed."""
        if not headers:
            raise ContractError("request has no headers")
        try:
            version = int(headers[H_VERSION])
            path = _text(headers[H_PATH])
            stream = bool(headers.get(H_STREAM, False))
            deadline = int(headers[H_DEADLINE]) / 1000
            request_id = _text(headers.get(H_REQUEST_ID, ""))
            sent = int(headers.get(H_SENT, 0)) / 1000
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"request header missing or invalid: {exc}") from exc
        if version != VERSION:
            raise ContractError(f"unsupported contract version {version}")
        if not path.startswith("/"):
            raise ContractError("request path must start with /")
        return cls(
            path=path,
            body=body,
            stream=stream,
            priority=priority or 0,
            deadline=deadline,
            request_id=request_id,
            sent=sent,
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """One piece of an answer, as the consumer publishes it to the reply queue.

    Piece 0 carries the backend's status and content type. A non-streamed
    answer is a single piece with ``last`` set. A streamed answer is several
    pieces of raw server-sent-event bytes, each holding one or more events; a
    stream that broke off ends with a last piece whose ``error`` says why.
    The last piece also carries, for usage accounting, the token counts the
    backend reported (when it did) and how long the request waited in the queue.
    """

    seq: int
    last: bool
    body: bytes = b""
    status: int | None = None
    content_type: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_ms: int | None = None
    """Milliseconds between the sender's publish and the consumer's start (clocks of both hosts)."""
    consumer: str | None = None
    """Liveness queue of the consumer connection that sent it: the sender ignores pieces from any
    other (a redelivered request served twice) and ends the answer if that queue disappears."""

    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {H_SEQ: self.seq, H_LAST: self.last}
        if self.status is not None:
            headers[H_STATUS] = self.status
        if self.error is not None:
            headers[H_ERROR] = self.error
        if self.prompt_tokens is not None:
            headers[H_PROMPT_TOKENS] = self.prompt_tokens
        if self.completion_tokens is not None:
            headers[H_COMPLETION_TOKENS] = self.completion_tokens
        if self.queue_ms is not None:
            headers[H_QUEUE_MS] = self.queue_ms
        if self.consumer is not None:
            headers[H_CONSUMER] = self.consumer
        return headers

    @classmethod
    def from_amqp(cls, headers: dict[str, Any] | None, body: bytes, content_type: str | None) -> Reply:
        if not headers:
            raise ContractError("reply has no headers")
        try:
            seq = int(headers[H_SEQ])
            last = bool(headers[H_LAST])
            status = int(headers[H_STATUS]) if H_STATUS in headers else None
            error = _text(headers[H_ERROR]) if H_ERROR in headers else None
            prompt_tokens = _count(headers.get(H_PROMPT_TOKENS))
            completion_tokens = _count(headers.get(H_COMPLETION_TOKENS))
            queue_ms = _count(headers.get(H_QUEUE_MS))
            consumer = _text(headers[H_CONSUMER]) if H_CONSUMER in headers else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"reply header missing or invalid: {exc}") from exc
        return cls(
            seq=seq,
            last=last,
            body=body,
            status=status,
            content_type=content_type,
            error=error,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            queue_ms=queue_ms,
            consumer=consumer,
        )


@dataclass(slots=True)
class Announcement:
    """A consumer telling senders that it serves ``model`` (or no longer does).

    ``card`` is the backend's own ``/v1/models`` entry (``max_model_len`` and
    so on), with ``id`` set to the name clients use.
    """

    consumer_id: str
    model: str
    state: str
    """``ready`` (consuming), ``paused`` (backend down) or ``gone`` (stopped)."""
    ttl: float
    """Seconds this announcement stays true unless renewed."""
    card: dict[str, Any] = field(default_factory=dict)

    READY = "ready"
    PAUSED = "paused"
    GONE = "gone"

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": VERSION,
                "consumer_id": self.consumer_id,
                "model": self.model,
                "state": self.state,
                "ttl": self.ttl,
                "card": self.card,
            }
        )

    @classmethod
    def decode(cls, body: bytes) -> Announcement:
        try:
            data = orjson.loads(body)
            card = data.get("card") or {}
            if not isinstance(card, dict):
                raise TypeError("card must be an object")
            return cls(
                consumer_id=str(data["consumer_id"]),
                model=str(data["model"]),
                state=str(data["state"]),
                ttl=float(data["ttl"]),
                card=card,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ContractError(f"bad announcement: {exc}") from exc


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise TypeError(f"expected text, got {type(value).__name__}")
