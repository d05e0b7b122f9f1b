"""The error catalogue: every error the dispatcher answers itself, in one table.

A client sees ``{"error": {"message", "type", "param", "code"}}`` with the
status below, whether the sender refused the request or a consumer could not
serve it (those travel to the sender as an ordinary reply). ``reason`` is the
label of ``dispatcher_rejected_requests_total``; it groups codes so that the
metric stays small. Errors the backend itself answers are relayed untouched
and are not in this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
import aiormq
import orjson

INVALID_REQUEST = "invalid_request_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
TIMEOUT = "timeout_error"


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """One code of the catalogue."""

    code: str
    status: int
    type: str
    reason: str
    """Label of ``dispatcher_rejected_requests_total`` for this code."""
    message: str
    """What the client reads when the place that raises it has nothing more precise to say."""

    def body(self, message: str | None = None, *, param: str | None = None) -> bytes:
        """The OpenAI-shaped JSON body of this error."""
        return error_body(message or self.message, type=self.type, code=self.code, param=param)

    def sse_event(self, message: str | None = None) -> bytes:
        """This error as a server-sent event, inside a stream that already started with 200."""
        return b"data: " + self.body(message) + b"\n\n"


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


CATALOGUE: dict[str, ErrorKind] = {}


def _kind(code: str, status: int, type: str, reason: str, message: str) -> ErrorKind:
    kind = ErrorKind(code, status, type, reason, message)
    CATALOGUE[code] = kind
    return kind


# Who is calling.
INVALID_API_KEY = _kind("invalid_api_key", 401, INVALID_REQUEST, "auth", "invalid bearer token")
TOKEN_DISABLED = _kind("token_disabled", 401, INVALID_REQUEST, "auth", "this bearer token has been revoked")
TOKEN_EXPIRED = _kind("token_expired", 401, INVALID_REQUEST, "auth", "this bearer token has expired")
TOO_MANY_AUTH_FAILURES = _kind(
    "too_many_auth_failures",
    429,
    RATE_LIMIT,
    "auth_throttled",
    "too many requests with an invalid bearer token from this client; retry later",
)
AUTH_UNAVAILABLE = _kind(
    "auth_unavailable", 503, SERVER, "auth_unavailable", "the token database is unreachable"
)

# What was sent.
HEADERS_TOO_LARGE = _kind(
    "request_header_fields_too_large",
    431,
    INVALID_REQUEST,
    "bad_request",
    "the request headers are too large",
)
REQUEST_TOO_LARGE = _kind("request_too_large", 413, INVALID_REQUEST, "bad_request", "request body too large")
REQUEST_TIMEOUT = _kind(
    "request_timeout", 408, INVALID_REQUEST, "slow_client", "the request body was not received in time"
)
CLIENT_DISCONNECTED = _kind(
    "client_disconnected",
    499,
    INVALID_REQUEST,
    "client_left",
    "the client left before sending its whole body",
)
INVALID_JSON = _kind(
    "invalid_json", 400, INVALID_REQUEST, "bad_request", "the request body is not valid JSON"
)
MISSING_MODEL = _kind(
    "missing_model", 400, INVALID_REQUEST, "bad_request", "you must provide a model parameter"
)
INVALID_PRIORITY = _kind(
    "invalid_priority", 400, INVALID_REQUEST, "bad_request", "X-Priority must be an integer"
)
INVALID_REQUEST_TIMEOUT = _kind(
    "invalid_request_timeout",
    400,
    INVALID_REQUEST,
    "bad_request",
    "X-Request-Timeout must be a positive number of seconds",
)
INVALID_REQUEST_PARAMS = _kind("invalid_request", 400, INVALID_REQUEST, "bad_request", "invalid request")
UNKNOWN_URL = _kind("unknown_url", 404, INVALID_REQUEST, "bad_request", "no such route")
INVALID_PATH = _kind(
    "invalid_path",
    400,
    INVALID_REQUEST,
    "bad_request",
    "invalid request path: paths are matched exactly, without dot segments, percent-encoding, "
    "backslashes, empty segments or a query string",
)
DUPLICATE_AUTHORIZATION = _kind(
    "duplicate_authorization",
    400,
    INVALID_REQUEST,
    "bad_request",
    "the Authorization header must appear at most once",
)
METHOD_NOT_ALLOWED = _kind(
    "method_not_allowed", 405, INVALID_REQUEST, "bad_request", "method not allowed here"
)

# Whether the model can take it now.
MODEL_NOT_FOUND = _kind(
    "model_not_found",
    404,
    INVALID_REQUEST,
    "unknown_model",
    "The model does not exist or you do not have access to it.",
)
MODEL_UNAVAILABLE = _kind(
    "model_unavailable", 503, SERVER, "no_consumer", "no server is available for this model right now"
)
OVERLOADED = _kind(
    "overloaded", 503, SERVER, "overloaded", "the dispatcher is overloaded: too many requests are waiting"
)
QUEUE_FULL = _kind(
    "queue_full", 429, RATE_LIMIT, "threshold", "too many requests are waiting for this model; retry later"
)
TOO_MANY_PARALLEL = _kind(
    "too_many_parallel_requests",
    429,
    RATE_LIMIT,
    "parallel",
    "too many requests of this token are queued or running at once (its max_parallel); retry later",
)
RATE_LIMIT_EXCEEDED = _kind(
    "rate_limit_exceeded",
    429,
    RATE_LIMIT,
    "rate_limit",
    "this token's rate limit is reached (requests or tokens per minute); retry later",
)

# The broker.
BROKER_UNAVAILABLE = _kind("broker_unavailable", 503, SERVER, "broker", "the message broker is unreachable")
QUEUE_UNAVAILABLE = _kind("queue_unavailable", 503, SERVER, "broker", "the request could not be queued")

# The answer.
DEADLINE_EXCEEDED = _kind(
    "deadline_exceeded", 504, TIMEOUT, "deadline", "the request was not answered before its deadline"
)
BAD_GATEWAY = _kind("bad_gateway", 502, SERVER, "other", "the model server gave no answer")
BACKEND_UNAVAILABLE = _kind("backend_unavailable", 502, SERVER, "backend", "the model server is unreachable")
BACKEND_ERROR = _kind("backend_error", 502, SERVER, "backend", "the connection to the model server failed")
ANSWER_TOO_LARGE = _kind(
    "answer_too_large",
    502,
    SERVER,
    "too_large",
    "the answer is larger than the dispatcher holds for one request (SENDER_MAX_BUFFERED_REPLY_BYTES); "
    "ask for it streamed, or for less",
)
CLIENT_TOO_SLOW = _kind(
    "client_too_slow",
    200,
    SERVER,
    "slow_client",
    "the answer was stopped: the client read it more slowly than it was generated, and more than "
    "the dispatcher holds for one request (SENDER_MAX_BUFFERED_REPLY_BYTES) waited for it",
)
"""Only ever an event inside a stream that started with 200."""
STREAM_INTERRUPTED = _kind("stream_interrupted", 200, SERVER, "interrupted", "the answer was cut short")
"""Only ever an event inside a stream that started with 200."""
SHUTTING_DOWN = _kind("shutting_down", 200, SERVER, "shutting_down", "the dispatcher is shutting down; retry")
"""Only ever an event inside a stream that started with 200."""
INTERNAL_ERROR = _kind("internal_error", 500, SERVER, "other", "internal error in the dispatcher")


ECHO_LIMIT = 100
"""Characters of a client's input (a model name, a path, a header) quoted back in an error or a log line."""


def clip(value: str, limit: int = ECHO_LIMIT) -> str:
    """``value`` as it may be quoted back: at most ``limit`` characters, then an ellipsis and the length."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}\u2026 ({len(value)} characters)"


def reason_of(code: str | None) -> str:
    """The metric reason of ``code`` (``other`` for a code outside the catalogue)."""
    kind = CATALOGUE.get(code or "")
    return kind.reason if kind is not None else "other"


BROKER_GONE: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    RuntimeError,
)
"""What an AMQP call raises when the connection or channel under it is gone (aiormq's
``ChannelInvalidStateError`` is a ``RuntimeError``)."""
