"""Every message that crosses the broker, with its AMQP properties built and parsed in one place.

Both sides use these types: the sender builds requests and cancellations and
reads replies and announcements; the consumer does the opposite. Publishing
goes through ``aio_pika.Message`` (requests, control messages) or raw
``Basic.Properties`` on the hot reply path, where aio-pika's message wrapper
would add about half again to the cost of each piece.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

from contract.names import DEFAULT_MAX_PRIORITY, VERSION

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
_JSON = "application/json"


class ContractError(ValueError):
    """A message on a dispatch queue does not follow this contract."""


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
    correlation_id: str = ""
    """Unique per request: every reply piece and a cancellation carry it."""
    reply_to: str = ""
    """The sender's reply queue."""

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

    def message(self) -> aio_pika.Message:
        """The persistent AMQP message: it survives a broker restart, and expires at the deadline."""
        if not self.correlation_id or not self.reply_to:
            raise ContractError("a request needs a correlation_id and a reply_to to be answered")
        return aio_pika.Message(
            self.body,
            headers=self.headers(),
            content_type=_JSON,
            priority=self.priority,
            correlation_id=self.correlation_id,
            reply_to=self.reply_to,
            expiration=self.ttl_ms() / 1000,
            type=REQUEST_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> Request:
        """Decode a delivered request; raise :class:`ContractError` when it is malformed."""
        if not message.reply_to or not message.correlation_id:
            raise ContractError("request has no reply_to or correlation_id")
        request = cls.from_amqp(message.headers, message.body, message.priority)
        return _with_route(request, message.correlation_id, message.reply_to)

    @classmethod
    def from_amqp(cls, headers: dict[str, Any] | None, body: bytes, priority: int | None) -> Request:
        """Decode a request from its headers; raise :class:`ContractError` when it is malformed."""
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
            raise ContractError(f"request header missing or invalid: {str(exc)[:200]}") from exc
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


def _with_route(request: Request, correlation_id: str, reply_to: str) -> Request:
    return Request(
        path=request.path,
        body=request.body,
        stream=request.stream,
        priority=request.priority,
        deadline=request.deadline,
        request_id=request.request_id,
        sent=request.sent,
        correlation_id=correlation_id,
        reply_to=reply_to,
    )


def request_id_of(message: AbstractIncomingMessage) -> str | None:
    """The request id of a delivered request, for a log line, without decoding the rest."""
    value = (message.headers or {}).get(H_REQUEST_ID)
    return value if isinstance(value, str) else None


def rejected_properties(message: AbstractIncomingMessage, reason: str) -> Basic.Properties:
    """Properties of the dead-letter copy of an unreadable request: its headers, plus why."""
    headers: dict[str, Any] = {
        key: value
        for key, value in (message.headers or {}).items()
        if isinstance(value, str | bytes | int | float | bool)
    }
    headers[H_REJECTED] = reason[:500]
    return Basic.Properties(
        headers=headers,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        delivery_mode=2,
    )


@dataclass(frozen=True, slots=True)
class Reply:
    """One piece of an answer, as the consumer publishes it to the reply queue.

    Piece 0 carries the backend's status and content type. A non-streamed
    answer is a single piece with ``last`` set. A streamed answer is several
    pieces of raw server-sent-event bytes, each holding one or more events; a
    stream that broke off ends with a last piece whose ``error`` says why.
    The last piece also carries, for usage accounting, the token counts the
    backend reported (when it did; for a stream cut short, the completion
    tokens counted up to the cut) and how long the request waited in the queue.
    When the client went away, the consumer still sends a last piece, a
    *report* with only the counts, which the sender charges to the request.
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
    liveness_queue: str | None = None
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
        if self.liveness_queue is not None:
            headers[H_CONSUMER] = self.liveness_queue
        return headers

    def properties(self, correlation_id: str) -> Basic.Properties:
        """Persistent: a reply published while its sender reconnects waits in the durable reply queue,
        through a restart of the broker too (a transient one would be dropped, and the sender would wait
        for it until the request's deadline). Quorum queues keep every message anyway."""
        return Basic.Properties(
            headers=self.headers(),
            content_type=self.content_type,
            correlation_id=correlation_id,
            message_type=REPLY_TYPE,
            delivery_mode=2,
        )

    @classmethod
    def from_properties(cls, properties: Basic.Properties, body: bytes) -> Reply:
        return cls.from_amqp(properties.headers, body, properties.content_type)

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
            liveness_queue = _text(headers[H_CONSUMER]) if H_CONSUMER in headers else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"reply header missing or invalid: {str(exc)[:200]}") from exc
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
            liveness_queue=liveness_queue,
        )


@dataclass(frozen=True, slots=True)
class Cancel:
    """The client of a request went away: whoever holds the request stops or skips it."""

    correlation_id: str
    deadline: float | None = None
    """Unix time in seconds after which the request cannot come up any more (None: unknown)."""

    def message(self) -> aio_pika.Message:
        headers: dict[str, Any] = {} if self.deadline is None else {H_DEADLINE: int(self.deadline * 1000)}
        return aio_pika.Message(self.correlation_id.encode(), headers=headers, type=CANCEL_TYPE)

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> Cancel:
        deadline = (message.headers or {}).get(H_DEADLINE)
        return cls(
            correlation_id=message.body.decode(errors="replace"),
            deadline=deadline / 1000 if isinstance(deadline, int) else None,
        )


MARKER_TYPE = "cancel-marker"


def marker_message(marker: str) -> aio_pika.Message:
    """A consumer's own mark at the end of the cancellation stream: once it reads it back, it has
    read every cancellation published before it started consuming."""
    return aio_pika.Message(marker.encode(), type=MARKER_TYPE)


def rollcall_message() -> aio_pika.Message:
    """A sender that starts asks every consumer to announce itself at once."""
    return aio_pika.Message(b"")


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
    max_priority: int = DEFAULT_MAX_PRIORITY
    """Top of the wire priority scale the consumer declared its queue with
    (``contract.wire_max_priority`` of its user scale): senders check it is theirs. A consumer from
    before the fair-share sub-levels announces its user scale (9), which a current sender (29)
    reports as a mismatch."""
    shared: bool = False
    """The consumer serves several names through one flow window, shared out by demand: this
    name's queue may show no consumer for a moment while the consumer serves it (its slots are
    busy with another name's requests), and requests for it are still taken."""

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
                "max_priority": self.max_priority,
                "shared": self.shared,
            }
        )

    def message(self) -> aio_pika.Message:
        return aio_pika.Message(self.encode(), content_type=_JSON)

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
                max_priority=int(data.get("max_priority", DEFAULT_MAX_PRIORITY)),
                shared=data.get("shared", False) is True,
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
