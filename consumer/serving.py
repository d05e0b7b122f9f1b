"""Serving one delivered request, from its delivery to its ack.

Every request takes this path, so it reads in one place: decode the message
(a malformed one is dead-lettered), answer 404 ``unknown_url`` without calling
the backend if its path is not one of the served routes (:mod:`contract.routes`,
compared byte for byte), answer 504 at once if its deadline passed,
call the backend, relay its answer through a :class:`ReplyWriter`, settle the
message exactly once (ack, requeue, or nothing when the broker took it back),
then count it and write its log line.

Serving decides nothing about consumption: it reports a :class:`Served`, and
the worker acts on it (an unreachable backend pauses consumption). The worker
acts inside ``async with serving.serve(message)``, before the message is
settled, so that a request requeued for another replica is not handed
straight back to this one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from types import TracebackType

import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

import contract
from consumer import backend_body, token_counts
from consumer.backend import Backend, BackendFailed, BackendUnreachable
from consumer.cancellation import Cancellations, Why
from consumer.metrics import ConsumerMetrics
from consumer.replies import ReplyPublisher, ReplyWriter
from consumer.settings import ConsumerSettings
from contract import ContractError, Request, errors
from contract.errors import BROKER_GONE, clip

log = logging.getLogger(__name__)

_JSON = "application/json"
_TOKENIZE_SECONDS = 2.0
"""How long a cut answer waits for the backend to count its prompt."""


class Outcome(enum.Enum):
    """What became of a delivered request: the ``outcome`` of its log line and of ``consumer_requests``."""

    ANSWERED = "answered"
    CANCELLED = "cancelled"
    """Its client went away while it was served."""
    SKIPPED = "skipped"
    """Its client went away before it was delivered: the backend never saw it."""
    REQUEUED = "requeued"
    """Given back to the queue for another replica: the backend could not be reached."""
    FAILED = "failed"
    GIVEN_BACK = "given back"
    """The broker connection dropped: the broker hands it to another consumer; not settled here."""
    REJECTED = "rejected"
    """Malformed: kept in the dead-letter queue."""
    REFUSED = "refused"
    """Its path is not a served route: answered 404 without calling the backend."""
    INTERRUPTED = "interrupted"
    """The consumer shut down before the answer was complete (after its grace period)."""
    REPLY_LOST = "reply lost"
    """A piece of its answer did not reach the sender (its reply queue is gone): stopped at once."""


class Trouble(enum.Enum):
    """What went wrong with the backend while serving, for the worker to act on."""

    UNREACHABLE = "unreachable"
    """Nothing was sent; unless it had been delivered before, the request is requeued."""
    FAILED = "failed"
    """The connection broke while the request was under way."""


@dataclass(frozen=True, slots=True)
class Served:
    outcome: Outcome
    trouble: Trouble | None = None


class Serving:
    """Serves requests of one model on one backend, replying on ``channel``."""

    def __init__(
        self,
        settings: ConsumerSettings,
        backend: Backend,
        metrics: ConsumerMetrics,
        cancellations: Cancellations,
        channel: AbstractChannel,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.cancellations = cancellations
        self.channel = channel
        self.routes = settings.relayed_routes
        self.streams = 0
        """Streamed answers under way: the more there are, the longer each batches its pieces."""

    def serve(self, message: AbstractIncomingMessage, *, liveness_queue: str) -> Delivery:
        """``async with serving.serve(message) as served``: answer it; settle it when the block ends."""
        return Delivery(self, message, liveness_queue)

    async def skip(self, message: AbstractIncomingMessage, *, liveness_queue: str) -> Served:
        """Settle a request whose client is already gone, without spending GPU time on it.

        The sender may still wait to charge it: it hears that nothing was generated.
        """
        await _settle(message.ack())
        if message.reply_to and message.correlation_id:
            publish = ReplyPublisher(self.channel, message.reply_to, message.correlation_id)
            await publish(
                contract.Reply(
                    seq=0,
                    last=True,
                    error="skipped: the client went away",
                    prompt_tokens=0,
                    completion_tokens=0,
                    liveness_queue=liveness_queue,
                )
            )
        self.metrics.requests.labels(self.settings.model, "", Outcome.SKIPPED.value).inc()
        request_id = contract.request_id_of(message)
        fields = {"request_id": clip(request_id or ""), "outcome": Outcome.SKIPPED.value}
        log.info("request", extra={"fields": fields})
        return Served(Outcome.SKIPPED)

    async def answer(self, request: Request, writer: ReplyWriter, *, redelivered: bool) -> Served:
        """Answer ``request`` through ``writer``, mapping the backend's failures to answers."""
        if request.path not in self.routes:
            # Only a sender that was bypassed, or one relaying routes this consumer was not told of.
            log.error(
                "refused request %s for path %r: not a served route",
                clip(request.request_id),
                clip(request.path),
            )
            await _fail(writer, errors.UNKNOWN_URL, f"no route for POST {clip(request.path)}")
            return Served(Outcome.REFUSED)
        remaining = request.deadline - time.time()
        if remaining <= 0:
            await _fail(writer, errors.DEADLINE_EXCEEDED, "the request expired while it waited in the queue")
            return Served(Outcome.ANSWERED)
        body, strip_usage = backend_body.rewrite(
            request, forward_priority=self.settings.forward_priority, max_priority=self.settings.max_priority
        )
        try:
            async with asyncio.timeout(remaining):
                await self._call_backend(request, body, writer, strip_usage)
        except TimeoutError:
            if writer.started:
                await self.count_prompt(request, writer)
                await writer.finish(error="the request ran past its deadline")
            else:
                await self.count_prompt(request, writer)
                await _fail(writer, errors.DEADLINE_EXCEEDED, "the request ran past its deadline")
        except BackendUnreachable as exc:
            if not redelivered:
                log.warning("backend unreachable (%s); requeueing request %s", exc, clip(request.request_id))
                return Served(Outcome.REQUEUED, Trouble.UNREACHABLE)
            await _fail(writer, errors.BACKEND_UNAVAILABLE)
            return Served(Outcome.ANSWERED, Trouble.UNREACHABLE)
        except BackendFailed as exc:
            message = f"the connection to the model server failed: {exc}"
            if writer.started:
                await self.count_prompt(request, writer)
                await writer.finish(error=message)
            else:
                await _fail(writer, errors.BACKEND_ERROR, message)
            return Served(Outcome.ANSWERED, Trouble.FAILED)
        return Served(Outcome.ANSWERED)

    async def _call_backend(
        self, request: Request, body: bytes, writer: ReplyWriter, strip_usage: bool
    ) -> None:
        writer.count = _nothing_counted  # a plain answer cut off: what it generated is not knowable
        async with self.backend.post(request.path, body) as response:
            content_type = response.headers.get("Content-Type")
            if not request.stream or response.status != 200:
                answer = await response.read()
                if response.status == 200:
                    writer.usage = token_counts.from_body(answer)
                elif _no_such_route(response.status, answer):
                    await _fail(
                        writer, errors.UNKNOWN_URL, f"the model's server has no route POST {request.path}"
                    )
                    return
                await writer.whole(response.status, content_type, answer)
                return
            writer.begin(response.status, content_type)
            watcher = token_counts.StreamUsage(strip=strip_usage)
            writer.count = watcher.so_far  # a cut stream still reports what it generated
            async for chunk in response.content.iter_any():
                relayed = watcher.feed(chunk)
                if relayed:
                    await writer.feed(relayed)
            rest = watcher.end()
            if rest:
                await writer.feed(rest)
        writer.usage = watcher.so_far()
        await writer.finish()

    async def count_prompt(self, request: Request, writer: ReplyWriter) -> None:
        """An answer cut before the backend reported its usage: ask the backend how long the prompt was
        (it was processed all the same), so that the last piece charges it too."""
        if writer.count is None:
            return  # the backend never saw it
        counted = writer.usage or writer.count()
        if counted[0] is not None:
            return
        body = token_counts.tokenize_body(request.path, request.body)
        if body is None:
            return
        try:
            async with asyncio.timeout(_TOKENIZE_SECONDS), self.backend.post("/tokenize", body) as response:
                answer = await response.read() if response.status == 200 else b""
        except (TimeoutError, BackendFailed, BackendUnreachable):
            return
        prompt = token_counts.count_of(answer)
        if prompt is not None:
            writer.usage = (prompt, counted[1])

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Keep an unreadable message for inspection, then settle it: never a crash, never a loop."""
        log.error(
            "malformed request message moved to %s: %s", self.settings.dead_letter_queue, clip(reason, 500)
        )
        try:
            channel = await self.channel.get_underlay_channel()
            await channel.basic_publish(
                message.body,
                routing_key=self.settings.dead_letter_queue,
                properties=contract.rejected_properties(message, reason),
            )
        except BROKER_GONE as exc:
            # Rejected instead: a broker policy with a dead-letter exchange may still keep it.
            log.warning("could not dead-letter a malformed message: %s", exc)
            await _settle(message.reject(requeue=False))
        else:
            # Acked, not rejected: the copy is kept, and a dead-letter policy must not keep a second.
            await _settle(message.ack())
        self.metrics.requests.labels(self.settings.model, "", Outcome.REJECTED.value).inc()

    def reply_lost(self, request: Request, reason: str) -> None:
        """A piece of the answer to ``request`` did not reach its sender: count it, and stop the
        generation now rather than computing an answer nobody can receive."""
        self.metrics.lost_replies.labels(self.settings.model, reason).inc()
        log.warning(
            "a reply to request %s was lost (%s); its generation is stopped", clip(request.request_id), reason
        )
        self.cancellations.reply_lost(request.correlation_id)

    def _level(self, request: Request) -> int:
        """The user level of ``request`` (its message priority also holds its fair-share sub-level)."""
        return contract.user_level(request.priority, self.settings.max_priority)

    def log_request(
        self,
        request: Request,
        status: int | None,
        outcome: Outcome,
        started: float,
        tokens: token_counts.Counts | None = None,
    ) -> None:
        """The request's metrics (tokens generated included, cut short or not) and its log line."""
        model = self.settings.model
        self.metrics.requests.labels(model, str(status or ""), outcome.value).inc()
        if tokens is not None:
            self.metrics.prompt_tokens.labels(model).inc(tokens[0] or 0)
            self.metrics.completion_tokens.labels(model).inc(tokens[1])
        if request.sent:
            self.metrics.queue_wait.labels(model, str(self._level(request))).observe(
                max(0.0, started - request.sent)
            )
        self.metrics.serve_time.labels(model).observe(time.time() - started)
        if not log.isEnabledFor(logging.INFO):
            return
        fields = {
            "request_id": clip(request.request_id),
            "model": model,
            "path": clip(request.path),
            "stream": request.stream,
            "priority": self._level(request),
            "wire_priority": request.priority,
            "status": status,
            "outcome": outcome.value,
            "queue_ms": round((started - request.sent) * 1000, 1) if request.sent else None,
            "serve_ms": round((time.time() - started) * 1000, 1),
            "prompt_tokens": tokens[0] if tokens else None,
            "completion_tokens": tokens[1] if tokens else None,
        }
        log.info("request", extra={"fields": fields})


class Delivery:
    """One delivered message being served; see :meth:`Serving.serve`.

    Entering answers it and gives the :class:`Served`; leaving settles the
    message and logs it. A cancellation by the consumer (client gone, broker
    connection lost) or a failure, while answering or while the worker acts on
    the outcome, still ends in one settlement and one log line.
    """

    def __init__(self, serving: Serving, message: AbstractIncomingMessage, liveness_queue: str) -> None:
        self._serving = serving
        self._message = message
        self._liveness_queue = liveness_queue
        self._request: Request | None = None
        self._writer: ReplyWriter | None = None
        self._served = Served(Outcome.ANSWERED)
        self._started = 0.0
        self._publisher: ReplyPublisher | None = None
        self._streaming = False

    async def __aenter__(self) -> Served:
        serving, message = self._serving, self._message
        try:
            request = Request.from_message(message)
        except ContractError as exc:
            await serving.dead_letter(message, str(exc))
            self._served = Served(Outcome.REJECTED)
            return self._served
        settings = serving.settings
        self._publisher = ReplyPublisher(
            serving.channel,
            request.reply_to,
            request.correlation_id,
            on_lost=lambda reason: serving.reply_lost(request, reason),
        )
        if request.stream:
            serving.streams += 1
            self._streaming = True
        writer = ReplyWriter(
            self._publisher,
            liveness_queue=self._liveness_queue,
            interval=flush_interval(serving.streams, settings),
            max_bytes=settings.flush_bytes,
            max_interval=settings.flush_interval_max,
        )
        self._request, self._writer = request, writer
        self._started = time.time()
        if request.sent:
            writer.queue_ms = max(0, round((self._started - request.sent) * 1000))
        try:
            self._served = await serving.answer(request, writer, redelivered=bool(message.redelivered))
        except BaseException as exc:
            if not await self._interrupted(exc):
                self._stream_ended()
                await self._settle_message()
                raise
        return self._served

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._request is None or self._writer is None:
            return False  # rejected: already settled
        self._stream_ended()
        handled = exc is not None and await self._interrupted(exc)
        await self._settle_message()
        if exc is None or handled:
            writer = self._writer
            self._serving.log_request(
                self._request, writer.status, self._served.outcome, self._started, writer.reported
            )
        return handled

    def _stream_ended(self) -> None:
        if self._streaming:
            self._streaming = False
            self._serving.streams -= 1

    async def _interrupted(self, exc: BaseException) -> bool:
        """Turn a cancellation by the consumer or a failure into an outcome; False for anything else."""
        assert self._request is not None and self._writer is not None
        writer = self._writer
        if isinstance(exc, asyncio.CancelledError):
            why = self._serving.cancellations.why(self._request.correlation_id)
            if why is None:
                return False
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if why is Why.CLIENT_GONE:
                outcome = Outcome.CANCELLED
                await self._serving.count_prompt(self._request, writer)
                await writer.cut("cancelled: the client went away")
            elif why is Why.REPLY_LOST:
                outcome = Outcome.REPLY_LOST  # nobody can receive the rest, nor a report
                writer.abandon()
            elif why is Why.SHUTDOWN and writer.started:
                # Past the grace period: the answer ends here with an error, its tokens counted.
                outcome = Outcome.INTERRUPTED
                await self._serving.count_prompt(self._request, writer)
                await writer.finish(error="the model server shut down in the middle of the answer")
            else:  # connection lost, or shutting down before anything was sent: another consumer serves it
                outcome = Outcome.GIVEN_BACK
                writer.abandon()
        elif isinstance(exc, Exception):
            log.error("request %s failed in the consumer", clip(self._request.request_id), exc_info=exc)
            outcome = Outcome.FAILED
            if not writer.finished:
                await _fail(writer, errors.INTERNAL_ERROR, "the dispatcher failed while serving this request")
        else:
            return False
        self._served = Served(outcome, self._served.trouble)
        return True

    async def _settle_message(self) -> None:
        outcome = self._served.outcome
        if outcome is Outcome.GIVEN_BACK:
            pass  # the broker took it back when the connection dropped
        elif outcome is Outcome.REQUEUED or (self._publisher is not None and self._publisher.lost):
            # A reply piece lost with the reply connection: served again, here or elsewhere.
            await _settle(self._message.nack(requeue=True))
        else:
            await _settle(self._message.ack())


def flush_interval(streams: int, settings: ConsumerSettings) -> float:
    """The interval a stream starts batching at, with ``streams`` under way (itself included): the
    timed pieces of all of them together stay near ``settings.flush_rate`` a second."""
    return min(settings.flush_interval_max, max(settings.flush_interval, streams / settings.flush_rate))


def _nothing_counted() -> token_counts.Counts:
    return (None, 0)


def _no_such_route(status: int, body: bytes) -> bool:
    """The backend has no such route: FastAPI's own ``{"detail": ...}`` 404 or 405 (vLLM answers its
    errors in OpenAI's shape, but not these), which the client gets as our ``unknown_url`` instead."""
    if status not in (404, 405):
        return False
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and "detail" in payload and "error" not in payload


async def _fail(writer: ReplyWriter, kind: errors.ErrorKind, message: str | None = None) -> None:
    await writer.whole(kind.status, _JSON, kind.body(message))


async def _settle(operation: object) -> None:
    """Await an ack/nack/reject, tolerating a channel that closed meanwhile (the broker redelivers).

    aiormq fails a call on a connection closing under it with the reason, or with a bare
    ``Exception``; raised from here, it ended the serving task before the request's log line."""
    try:
        await operation  # type: ignore[misc]
    except Exception as exc:
        log.warning("could not settle message: %s", repr(exc) if not str(exc) else exc)
