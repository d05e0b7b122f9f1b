"""Admission: from an HTTP request to one the broker may queue, or the error the client gets.

Everything that can refuse a forwarded call before it is queued happens
here, in this order: the bearer token, the body (size, time, JSON, ``model``),
the priority and deadline headers, then the admission steps: the model
queue's numbers (unknown model, no live consumer, the token's own backlog
over its threshold, or the whole queue with ``SENDER_THRESHOLD_SCOPE=queue``),
the token's parallel limit, and its rate limit. The first refusal wins, so
clients see the same code for the same mistake whatever else is wrong.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiormq
import orjson
from starlette.requests import ClientDisconnect, Request

from contract import errors, servable_model_name
from contract.errors import clip
from contract.queues import QueueTypeMismatch
from sender.backlog import Backlog, expected_wait
from sender.broker import BrokerUnavailable
from sender.broker_hold import BrokerHold, Retry
from sender.errors import ApiError
from sender.limits import Ask, RateLimiter, Reservation
from sender.queue_stats import QueueStats, QueueStatsCache
from sender.settings import SenderSettings
from sender.tokens import Token, TokenStore

log = logging.getLogger(__name__)

_ELECTION_WAIT = 3.0
"""Seconds a model queue may report no consumer while one is announced, before the sender refuses:
a quorum queue elects a new leader in about a second."""


@dataclass(frozen=True, slots=True)
class AdmittedRequest:
    """A forwarded call as read from the client, ready to be queued."""

    token: Token
    model: str
    path: str
    """The backend path: ``/v1/chat/completions``, ``/tokenize``, ..."""
    body: bytes
    """The client's JSON body, byte for byte."""
    stream: bool
    priority: int
    timeout: float
    """Seconds the request may take in all, from when it is queued."""
    asked_at: float
    """When (monotonic) admission first asked the broker about it: the start of its allowance for
    waiting on the broker (:mod:`sender.broker_hold`)."""
    request_id: str
    asleep: bool = False
    """Admitted while its model had no live consumer (a configured model being woken up)."""
    reservation: Reservation | None = None
    """Tokens reserved under the token's tokens-per-minute limit, settled when the answer ends."""


class Refused(ApiError):
    """An admission step refused a request already read: it is still counted under its model and token."""

    def __init__(self, error: ApiError, request: AdmittedRequest) -> None:
        super().__init__(
            error.kind, error.message, param=error.param, retry_after=error.retry_after, close=error.close
        )
        self.request = request


class Admission:
    def __init__(
        self,
        tokens: TokenStore,
        queue_stats: QueueStatsCache,
        limiter: RateLimiter,
        settings: SenderSettings,
        hold: BrokerHold,
        *,
        declare: Callable[[str], Awaitable[None]],
        backlog: Backlog | None = None,
        announced: Callable[[str], bool] = lambda _: False,
        shared: Callable[[str], bool] = lambda _: False,
    ) -> None:
        """``declare``: :meth:`sender.broker.Broker.declare_model_queue`, for configured models;
        ``announced`` says whether a consumer of the model announced itself ready and is not known
        to be gone (the registry); ``shared``, whether such a consumer shares its flow window among
        several names (the queue may then show no consumer while it serves the model)."""
        self._tokens = tokens
        self._shared = shared
        self._announced = announced
        self._queue_stats = queue_stats
        self._limiter = limiter
        self._settings = settings
        self._declare = declare
        self.configured = frozenset(settings.configured_models())
        self._backlog = backlog or Backlog()
        self._hold = hold

    async def admit(self, request: Request, path: str, request_id: str) -> AdmittedRequest:
        """The request, read and admitted; :class:`ApiError` (:class:`Refused` once it was read) if not."""
        settings = self._settings
        token = await self.authenticate(request)
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_seconds)
        payload = _parse_json(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(errors.MISSING_MODEL, param="model")
        if not token.may_use(model):
            raise model_not_found(model)  # as if it did not exist: do not tell which models do
        admitted = AdmittedRequest(
            token=token,
            model=model,
            path=path,
            body=body,
            stream=payload.get("stream") is True,
            priority=effective_priority(token, request.headers.get("x-priority"), settings.max_priority),
            timeout=request_timeout(
                request.headers.get("x-request-timeout"), token.deadline_seconds(settings.deadline_seconds)
            ),
            request_id=request_id,
            asked_at=time.monotonic(),
        )
        try:
            asleep = await self._check_queue(model, token, request, admitted.timeout, admitted.asked_at)
            if asleep:
                admitted = dataclasses.replace(admitted, asleep=True)
            refusal = parallel_refusal(self._backlog, token, settings)
            if refusal is not None:
                raise refusal
            # The limiter comes last: it reserves tokens, which a later refusal would have to give back.
            decision = await self._limiter.admit(token, Ask.of(model, payload, len(body)))
        except ApiError as exc:
            raise Refused(exc, admitted) from exc
        held = time.monotonic() - admitted.asked_at
        if held >= BrokerHold.POLL_SECONDS:  # held for the broker: that time counts against the deadline
            admitted = dataclasses.replace(admitted, timeout=max(0.001, admitted.timeout - held))
        if decision.retry_after is not None:
            raise Refused(ApiError(errors.RATE_LIMIT_EXCEEDED, retry_after=decision.retry_after), admitted)
        return dataclasses.replace(admitted, reservation=decision.reservation)

    async def authenticate(self, request: Request) -> Token:
        """The caller's token, usable now; the 401 (or 503) it gets otherwise."""
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise ApiError(
                errors.INVALID_API_KEY, "missing bearer token: send 'Authorization: Bearer <token>'"
            )
        try:
            token = await self._tokens.lookup(secret)
        except Exception as exc:  # TokenUnavailable, or anything the lookup could not survive
            log.warning("token lookup failed: %s", type(exc.__cause__ or exc).__name__)
            raise ApiError(errors.AUTH_UNAVAILABLE, retry_after=self._settings.retry_after_seconds) from exc
        if token is None:
            raise ApiError(errors.INVALID_API_KEY)
        if not token.enabled:
            raise ApiError(errors.TOKEN_DISABLED)
        if token.expired():
            raise ApiError(errors.TOKEN_EXPIRED)
        return token

    async def _consumers_back(self, model: str, stats: QueueStats) -> QueueStats:
        """A quorum queue electing a new leader (its node lost) reports no consumer for a moment,
        while its consumers stay subscribed: with a consumer still announced, look again for a
        short while before refusing."""
        deadline = time.monotonic() + _ELECTION_WAIT
        while stats.exists and stats.consumers == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            stats = await self._queue_stats.get(model, fresh=True)
        return stats

    async def _check_queue(
        self, model: str, token: Token, request: Request, timeout: float, asked_at: float
    ) -> bool:
        """Raise the error the client should get if ``model``'s queue cannot take this request now;
        whether the model sleeps (no live consumer: the request waits for its wake-up). While the
        broker is away, the request is held for it (:mod:`sender.broker_hold`)."""
        settings = self._settings
        if not servable_model_name(model):
            raise model_not_found(model)
        configured = model in self.configured
        deadline = time.time() + timeout
        stats = await self._hold.attempt(
            lambda: self._read_queue(model, configured),
            receive=request.receive,
            deadline=deadline,
            since=asked_at,
        )
        if not stats.exists:
            raise model_not_found(model)
        if stats.consumers == 0 and self._shared(model):
            stats = dataclasses.replace(
                stats, consumers=1
            )  # served, its slots busy with the backend's other names
        if stats.consumers == 0 and not (configured or settings.queue_without_consumers):
            raise self._unavailable(
                errors.MODEL_UNAVAILABLE, f"no server is available for model `{clip(model)}` right now"
            )
        if stats.messages >= settings.max_queued_per_model:
            raise self._unavailable(
                errors.OVERLOADED,
                f"the dispatcher is overloaded: too many requests are waiting for model `{clip(model)}`",
            )
        backlog = self._backlog
        if settings.threshold_scope == "queue":
            if stats.messages >= token.threshold:
                ahead = stats.messages - token.threshold + 1
                raise ApiError(
                    errors.QUEUE_FULL,
                    f"too many requests are waiting for model `{clip(model)}`; retry later",
                    retry_after=self._expected_wait(ahead, backlog.start_rate(model)),
                )
            return stats.consumers == 0
        waiting = backlog.waiting(model, token.name)
        if waiting >= token.threshold:
            # The token's own backlog only: another token's burst is not charged to this one.
            rate = backlog.start_rate(model, token.name) or backlog.start_rate(model)
            raise ApiError(
                errors.QUEUE_FULL,
                f"too many of this token's requests are waiting for model `{clip(model)}` "
                f"({waiting}; its threshold is {token.threshold}); retry later",
                retry_after=self._expected_wait(waiting - token.threshold + 1, rate),
            )
        return stats.consumers == 0

    async def _redeclare(self, model: str) -> None:
        try:
            await self._declare(model)
        except (aiormq.exceptions.ChannelClosed, QueueTypeMismatch) as exc:  # refused: type, permission
            log.error("could not declare the queue of model %s: %s", model, exc)
            raise self._unavailable(
                errors.MODEL_UNAVAILABLE, f"no server is available for model `{clip(model)}` right now"
            ) from exc

    def _expected_wait(self, ahead: int, rate: float) -> int:
        settings = self._settings
        return expected_wait(
            ahead, rate, floor=settings.retry_after_seconds, ceiling=settings.retry_after_max_seconds
        )

    async def _read_queue(self, model: str, configured: bool) -> QueueStats:
        """The model queue's numbers; :class:`Retry` while the broker cannot give them, or while a
        queue is missing or has no consumer just after the broker went away or came back (the
        consumers reconnect too, and redeclare their queue). A configured model's queue that is
        missing is declared again."""
        try:
            stats = await self._queue_stats.get(model)
            if not stats.exists or stats.consumers == 0:
                # Refusing is rare: make sure with numbers newer than, say, a consumer's announcement.
                stats = await self._queue_stats.get(model, fresh=True)
            if not stats.exists and configured:
                # Lost by the broker since this sender declared it (or refused then): declare it again.
                await self._redeclare(model)
                stats = await self._queue_stats.get(model, fresh=True)
            if stats.exists and stats.consumers == 0 and self._announced(model) and not self._shared(model):
                stats = await self._consumers_back(model, stats)
        except (BrokerUnavailable, TimeoutError, ConnectionError) as exc:
            raise Retry(self._unavailable(errors.BROKER_UNAVAILABLE)) from exc
        if self._hold.recently_reconnected():
            if not stats.exists:  # the node that held it may be gone; its consumers redeclare it
                raise Retry(model_not_found(model))
            if stats.consumers == 0 and not configured and not self._shared(model):
                message = f"no server is available for model `{clip(model)}` right now"
                raise Retry(self._unavailable(errors.MODEL_UNAVAILABLE, message))
        return stats

    def _unavailable(self, kind: errors.ErrorKind, message: str | None = None) -> ApiError:
        return ApiError(kind, message, retry_after=self._settings.retry_after_seconds)


def parallel_refusal(backlog: Backlog, token: Token, settings: SenderSettings) -> ApiError | None:
    """The 429 a request of ``token`` gets when its ``max_parallel`` requests are already queued or
    running (in this sender); ``Retry-After`` is the expected time until one of them ends."""
    if token.max_parallel is None or backlog.in_flight(token.name) < token.max_parallel:
        return None
    wait = expected_wait(
        1,
        backlog.end_rate(token.name),
        floor=settings.retry_after_seconds,
        ceiling=settings.retry_after_max_seconds,
    )
    return ApiError(
        errors.TOO_MANY_PARALLEL,
        f"this token already has {token.max_parallel} requests queued or running (its max_parallel); "
        "retry when one ends",
        retry_after=wait,
    )


def effective_priority(token: Token, requested: str | None, max_priority: int) -> int:
    """The token's priority, or the lower one the request asks for with ``X-Priority``,
    within the queue's scale (0 to ``max_priority``)."""
    ceiling = max(0, min(token.priority, max_priority))
    if requested is None:
        return ceiling
    try:
        value = int(requested.strip())
    except ValueError:
        raise ApiError(errors.INVALID_PRIORITY) from None
    return max(0, min(value, ceiling))


def request_timeout(requested: str | None, ceiling: float) -> float:
    """Seconds the request may take in all: the server's deadline, or the shorter one the client
    asks for with ``X-Request-Timeout`` (a client that gives up sooner should not keep a GPU busy)."""
    if requested is None:
        return ceiling
    try:
        value = float(requested.strip())
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ApiError(errors.INVALID_REQUEST_TIMEOUT)
    return min(value, ceiling)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        errors.MODEL_NOT_FOUND,
        f"The model `{clip(model)}` does not exist or you do not have access to it.",
        param="model",
    )


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            errors.REQUEST_TIMEOUT,
            f"the request body was not received within {timeout:g} seconds",
            close=True,
        ) from None
    except ClientDisconnect:
        # Nobody reads the answer; 499 (as nginx logs it) marks the request in the log and metrics.
        raise ApiError(errors.CLIENT_DISCONNECTED) from None
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(errors.REQUEST_TOO_LARGE, f"request body is larger than {limit} bytes")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(errors.INVALID_JSON) from None
    if not isinstance(payload, dict):
        raise ApiError(errors.INVALID_JSON, "the request body must be a JSON object")
    return payload
