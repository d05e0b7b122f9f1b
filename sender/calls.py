"""Requests in flight: publish one, route its replies back to it, cancel it when nobody waits.

A request is published with publisher confirms, but the confirm is awaited
alongside the answer rather than before it (one broker round trip less per
request); a nack or a return still ends the call with an error. Replies are
routed by correlation id to their :class:`PendingCall`. The first piece names
the consumer connection serving the answer; a watchdog checks that
connection's liveness queue, so a consumer that dies mid-answer ends the
answer with an error at once rather than at the deadline. A call closed before
its answer was complete is cancelled on the control exchange, so no consumer
spends GPU time on it.

Such a call is still charged what it generated: it waits (at most
``settle_seconds``, and at most ``settle_calls`` of them at once, the oldest
settled first) for the consumer's last piece, which carries the tokens
generated up to the cut, before it is *settled* (its usage row written, its
tokens-per-minute reservation replaced by the real count). A call that
ended normally settles at once.

Memory per request is bounded: the pieces waiting for a slow client (or the
pieces of a non-streamed answer being put back together) may not exceed
``max_buffered`` bytes. Past it the request is stopped: the pieces held are
dropped, the generation is cancelled, and the client reads an error instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aiormq.abc
from aio_pika.abc import AbstractExchange

import contract
from contract import Cancel, Reply, Request, liveness
from contract.errors import BROKER_GONE, clip
from sender.broker import Broker, BrokerUnavailable, really_cancelled

log = logging.getLogger(__name__)

UNREACHABLE_GONE = 3.0
"""Seconds a consumer's liveness queue may stay unreachable (its node killed: the cluster waits for
the node and answers nothing) before its answers end with an error."""


DEFAULT_MAX_BUFFERED = 64 * 1024 * 1024

REORDER_WAIT = 3.0
"""Seconds a piece that came before an earlier one of its answer waits for it: a piece delivered on a
connection that dropped comes again only once the sender subscribed anew, possibly after later
pieces. Past it the earlier piece counts as lost."""


class _Origin(enum.Enum):
    RECEIVED = "received"
    AGAIN = "again"
    """Redelivered by the broker: it may have been handed over before its ack was lost."""
    HERE = "here"
    """Made by this sender to end the answer (consumer gone, reply queue lost, client gone...)."""


class Buffered:
    """Reply bytes this sender holds for its clients, all requests together (a metric)."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class PublishFailed(Exception):
    """The broker did not take a request (no connection, no such queue, or a nack)."""


class PendingCall:
    """The replies to one published request, in order, as they arrive."""

    def __init__(
        self,
        correlation_id: str,
        model: str,
        deadline: float,
        on_done: Callable[[PendingCall], None],
        owner: str = "",
        *,
        stream: bool = True,
        request_id: str = "",
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        buffered: Buffered | None = None,
        on_overflow: Callable[[], None] = lambda: None,
    ) -> None:
        self.correlation_id = correlation_id
        self.model = model
        self.owner = owner
        """Name of the token that sent it (its backlog and parallel count, ``sender/backlog.py``)."""
        self.deadline = deadline
        self.stream = stream
        self.request_id = request_id
        self._replies: asyncio.Queue[tuple[Reply, _Origin]] = asyncio.Queue()
        self._on_done = on_done
        self._closed = False
        self._max_buffered = max_buffered
        self._buffered = 0
        """Bytes of the pieces in the queue, plus those held while a whole answer is put together."""
        self._queued = 0
        """Of which in the queue."""
        self._total = buffered if buffered is not None else Buffered()
        self._on_overflow = on_overflow
        self.overflowed = False
        """The answer outgrew ``max_buffered``: it was stopped, and the client gets an error."""
        self._expected_seq = 0
        self._ahead: dict[int, Reply] = {}
        """Pieces of the owning consumer that came before an earlier one, by ``seq``."""
        self._gap_since = 0.0
        """When (loop time) the oldest piece in ``_ahead`` came."""
        self.liveness_queue: str | None = None
        """Liveness queue of the consumer serving the answer, from its first piece."""
        self.finished = False
        """Whether the last piece of the answer arrived."""
        self.server_gone = False
        self.abandoned = False
        self.publish_error: str | None = None
        """Set when the broker refused the request; the call then ends without any reply."""
        self.final: Reply | None = None
        """The last piece of the answer, once it arrived (it carries the usage)."""
        self.answered = False
        """Whether any piece arrived: a consumer took the request off the queue."""
        self.events = 0
        """Server-sent events relayed (``data: {`` lines): the tokens of a stream whose consumer
        could not report them (it died), roughly."""
        self._settled = False
        self._on_settled: list[Callable[[], None]] = []
        self.copies: list[str] = []
        """Correlation ids of a request published more than once (its connection dropped before the
        confirm), oldest first, until one of them answers."""

    def when_settled(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the call's usage is known (at once if it is)."""
        if self._settled:
            action()
        else:
            self._on_settled.append(action)

    @property
    def settled(self) -> bool:
        return self._settled

    def settle(self) -> None:
        """The usage is as known as it will be: run what waited for it, once."""
        if self._settled:
            return
        self._settled = True
        actions, self._on_settled = self._on_settled, []
        for action in actions:
            try:
                action()
            except Exception:
                log.exception("accounting of request %s failed", self.correlation_id)

    def report(self, reply: Reply) -> None:
        """The consumer's last piece, come after the client left: it carries the tokens generated."""
        if self.liveness_queue is not None and reply.liveness_queue not in (None, self.liveness_queue):
            return  # a redelivered copy served elsewhere; the owner's report is the one
        self.final = reply
        self.settle()

    @property
    def awaits_report(self) -> bool:
        """Closed before its answer was complete, on a request the broker took: a consumer may
        still be generating, and will say how much."""
        return not self.finished and self.publish_error is None and not self.server_gone

    def deliver(self, reply: Reply, *, again: bool = False) -> None:
        """A piece from the broker; ``again``: redelivered (its first copy may have been handed over)."""
        self._put(reply, _Origin.AGAIN if again else _Origin.RECEIVED)

    def _end(self, error: str) -> None:
        """End the answer with ``error`` after what arrived so far (made here, not by a consumer)."""
        self._put(
            Reply(seq=self._expected_seq, last=True, error=error, liveness_queue=self.liveness_queue),
            _Origin.HERE,
        )

    def _put(self, reply: Reply, origin: _Origin) -> None:
        if self.overflowed:
            return
        size = len(reply.body)
        if size and self._buffered + size > self._max_buffered:
            self._overflow()
            return
        self._hold(size, queued=True)
        self._replies.put_nowait((reply, origin))

    def drop_unread(self) -> None:
        """Forget the pieces that arrived and were not read (the client is gone); a last one among
        them is the report of what the request used."""
        while not self._replies.empty():
            reply, origin = self._replies.get_nowait()
            if reply.last and origin is not _Origin.HERE and reply.liveness_queue is not None:
                self.report(reply)
        for reply in self._ahead.values():
            if reply.last:
                self.report(reply)
        self._hold(-self._queued, queued=True)
        self._drop_ahead()

    def _hold(self, size: int, *, queued: bool = False) -> None:
        self._buffered += size
        if queued:
            self._queued += size
        self._total.bytes += size

    def _drop_queued(self) -> None:
        while not self._replies.empty():
            self._replies.get_nowait()
        self._hold(-self._queued, queued=True)
        self._drop_ahead()

    def _drop_ahead(self) -> None:
        self._hold(-sum(len(reply.body) for reply in self._ahead.values()))
        self._ahead.clear()

    def _overflow(self) -> None:
        """Too much waits for the client: drop it, stop the generation, end the answer with an error."""
        self.overflowed = True
        self._on_overflow()
        log.warning(
            "request %s for %s stopped: its answer outgrew SENDER_MAX_BUFFERED_REPLY_BYTES (%d bytes) "
            "waiting for the client%s; the generation is cancelled",
            clip(self.request_id),
            clip(self.model),
            self._max_buffered,
            " to read it" if self.stream else " (a non-streamed answer is held whole)",
        )
        self.close()  # cancelled now, not once the client reads on; what was held is dropped
        reply = Reply(seq=self._expected_seq, last=True, error="answer outgrew the buffer")
        self._replies.put_nowait((reply, _Origin.HERE))

    def publish_failed(self, error: str) -> None:
        self.publish_error = error
        self._end(error)

    async def next(self, wait: float) -> Reply:
        """The next piece of the answer; ``TimeoutError`` if none comes in time.

        A piece the broker delivers again (on a connection that dropped before
        its ack) is dropped if it was handed over already. One that comes before
        an earlier piece waits for it (:data:`REORDER_WAIT`); a gap that stays,
        or a piece that comes twice otherwise (the same consumer serving the
        request anew), means the answer cannot be trusted any more: it ends
        with an error.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + max(wait, 0.0)
        while True:
            held = self._ahead.pop(self._expected_seq, None)
            if held is not None:
                self._hold(-len(held.body))
                return self._check(held)
            limit = until
            if self._ahead:
                gap_end = self._gap_since + REORDER_WAIT
                if loop.time() >= gap_end:
                    self._drop_ahead()
                    return Reply(
                        seq=self._expected_seq, last=True, error=f"reply piece {self._expected_seq} was lost"
                    )
                limit = min(until, gap_end)
            try:
                async with asyncio.timeout_at(limit):
                    reply, origin = await self._replies.get()
            except TimeoutError:
                if limit < until:
                    continue  # the gap's wait ran out, not the caller's
                raise
            self._hold(-len(reply.body), queued=True)
            if self.abandoned or self.overflowed or self.publish_error is not None:
                return reply
            if origin is _Origin.HERE:
                return self._accept(reply)  # after whatever arrived before it, whatever its seq
            if reply.liveness_queue is not None:
                if self.liveness_queue is None:
                    self.liveness_queue = reply.liveness_queue  # the first consumer to answer owns it
                elif reply.liveness_queue != self.liveness_queue:
                    continue  # a redelivered copy served by another consumer: the first answer stands
                if origin is _Origin.AGAIN and (reply.seq < self._expected_seq or reply.seq in self._ahead):
                    continue  # delivered again: its first copy was handed over already
                if reply.seq > self._expected_seq:
                    if not self._ahead:
                        self._gap_since = loop.time()
                    self._ahead[reply.seq] = reply
                    self._hold(len(reply.body))
                    continue
            return self._check(reply)

    async def whole(self, first: Reply) -> Reply:
        """A non-streamed answer that came in several pieces (larger than one broker message), put
        back together from ``first`` on: one last piece with the whole body, or the piece that
        ended it with an error. The pieces held count against ``max_buffered`` meanwhile."""
        parts = [first.body]
        self._hold(len(first.body))
        try:
            while True:
                reply = await self.next(self.deadline - time.time())
                if reply.error is not None or self.overflowed or self.abandoned:
                    return reply
                parts.append(reply.body)
                self._hold(len(reply.body))
                if reply.last:
                    return dataclasses.replace(
                        reply, body=b"".join(parts), status=first.status, content_type=first.content_type
                    )
        finally:
            self._hold(-sum(len(part) for part in parts))

    def _check(self, reply: Reply) -> Reply:
        if reply.seq != self._expected_seq:
            return Reply(seq=reply.seq, last=True, error=f"reply piece {self._expected_seq} was lost")
        return self._accept(reply)

    def _accept(self, reply: Reply) -> Reply:
        self._expected_seq += 1
        self.events += reply.body.count(b"data: {")
        self.finished = reply.last
        if reply.last:
            self.final = reply
        return reply

    def consumer_gone(self) -> None:
        """The consumer serving the answer lost its broker connection: the answer will not go on."""
        self.server_gone = True
        self._end("the model server stopped in the middle of the answer")

    def reply_lost(self) -> None:
        """The reply queue was lost with what it held: the answer will not come (or not whole)."""
        if self.finished:
            return
        self.server_gone = True
        self._end("the answer was lost: this dispatcher's reply queue was removed")

    def abandon(self, reason: str = "the client went away") -> None:
        """Nobody will read the answer: end the wait for it now."""
        self.abandoned = True
        self._end(reason)

    def close(self) -> None:
        """Stop listening; an unfinished request is cancelled wherever it is (queued or running)."""
        if self._closed:
            return
        self._closed = True
        self._on_done(self)
        self._drop_queued()  # pieces nobody will read


class Calls:
    """Every request this sender published and still awaits replies for."""

    STALLED_AFTER = 2.0
    """Seconds after which a publish still unconfirmed means the broker has stopped taking them
    (a memory or disk alarm blocks publishers): new requests are not published meanwhile."""

    def __init__(
        self,
        broker: Broker,
        *,
        on_published: Callable[[PendingCall], None] = lambda _: None,
        on_taken: Callable[[PendingCall], None] = lambda _: None,
        on_closed: Callable[[PendingCall], None] = lambda _: None,
        liveness_interval: float = 1.0,
        confirm_timeout: float = 10.0,
        settle_seconds: float = 10.0,
        settle_calls: int = 10_000,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        on_overflow: Callable[[], None] = lambda: None,
        republish_within: float = 0.0,
    ) -> None:
        """``on_published``, ``on_taken`` and ``on_closed`` hear of a call when it is published, when
        its first reply shows that a consumer took it off the queue, and when it is closed;
        ``on_overflow`` of one stopped because its answer outgrew ``max_buffered`` bytes. A request
        whose connection dropped before its confirm is published again once the broker is back,
        within ``republish_within`` seconds of its first publish."""
        self._broker = broker
        self._on_published = on_published
        self._on_taken = on_taken
        self._on_closed = on_closed
        self._liveness_interval = liveness_interval
        self._confirm_timeout = confirm_timeout
        self._max_buffered = max_buffered
        self._on_overflow = on_overflow
        self.buffered = Buffered()
        """Reply bytes held for clients right now, all requests together."""
        self._pending: dict[str, PendingCall] = {}
        self._settle_seconds = settle_seconds
        self._settle_calls = settle_calls
        self._settling: dict[str, tuple[float, PendingCall]] = {}
        """Calls closed before their answer was complete, awaiting the consumer's report: correlation
        id -> (settle anyway after, monotonic). Insertion order is expiry order."""
        self._closing = False
        self._republish_within = republish_within
        self._unconfirmed: dict[str, float] = {}
        """correlation id -> when published (monotonic), oldest first, until its confirm (or failure)."""
        self._background: set[asyncio.Future[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._unreachable_since: dict[str, float] = {}
        """Liveness queues that did not answer, since when (monotonic)."""

    def start(self) -> None:
        self._watchdog = asyncio.create_task(self._watch_liveness())

    def close(self) -> None:
        """End every wait for an answer (the broker connection is about to close)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        for call in list(self._pending.values()):
            call.abandon("the dispatcher is shutting down")
        self._closing = True
        self.settle_all()

    async def wait_settled(self, timeout: float) -> None:
        """At shutdown, while the broker connection is still open: give the reports of the calls cut
        short (by the shutdown itself, often) up to ``timeout`` seconds to arrive."""
        for _ in range(math.ceil(timeout / 0.05)):  # polled: it happens once, at shutdown
            if not self._settling:
                return
            await asyncio.sleep(0.05)

    def settle_all(self) -> None:
        """Settle every call still awaiting its report with what is known (at shutdown)."""
        settling, self._settling = self._settling, {}
        for _, call in settling.values():
            call.settle()

    def publish(self, model: str, request: Request, owner: str = "") -> PendingCall:
        """Publish ``request`` to the model's queue and return where its replies will arrive.

        The publisher confirm is awaited alongside the answer rather than before it;
        a nack or a return (no such queue) ends the call with :attr:`PendingCall.publish_error`.
        """
        if self.publishing_stalled():
            raise PublishFailed("the broker is not confirming publishes (a memory or disk alarm?)")
        try:
            exchange = self._broker.request_exchange()
        except BrokerUnavailable as exc:
            raise PublishFailed(str(exc)) from exc
        pending = PendingCall(
            uuid.uuid4().hex,
            model,
            request.deadline,
            self._forget,
            owner,
            stream=request.stream,
            request_id=request.request_id,
            max_buffered=self._max_buffered,
            buffered=self.buffered,
            on_overflow=self._on_overflow,
        )
        self._send(pending, request, exchange, time.monotonic())
        self._on_published(pending)
        return pending

    def _send(
        self, pending: PendingCall, request: Request, exchange: AbstractExchange, first_sent: float
    ) -> None:
        request = dataclasses.replace(
            request, correlation_id=pending.correlation_id, reply_to=self._broker.reply_queue_name
        )
        self._pending[pending.correlation_id] = pending
        self._unconfirmed[pending.correlation_id] = time.monotonic()
        queue = contract.model_queue(pending.model)
        publishing = exchange.publish(request.message(), routing_key=queue, mandatory=True)
        confirm = asyncio.ensure_future(publishing)
        # A confirm lost with its connection must not leave the client waiting until the deadline.
        overdue = asyncio.get_running_loop().call_later(self._confirm_timeout, confirm.cancel)
        confirm.add_done_callback(lambda done: self._confirmed(pending, request, done, overdue, first_sent))

    def _confirmed(
        self,
        pending: PendingCall,
        request: Request,
        confirm: asyncio.Future[Any],
        overdue: asyncio.TimerHandle,
        first_sent: float,
    ) -> None:
        late = overdue.when() <= asyncio.get_running_loop().time()
        overdue.cancel()
        self._unconfirmed.pop(request.correlation_id, None)
        exc = None if confirm.cancelled() else confirm.exception()
        if (not confirm.cancelled() and exc is None) or pending.answered:
            return  # confirmed, or another copy of the request is being answered
        if pending.copies and request.correlation_id in pending.copies[:-1]:
            return  # a copy published again meanwhile stands in for this one
        if late:
            pending.publish_failed("the broker did not confirm the request in time")
        elif isinstance(exc, (aiormq.exceptions.DeliveryError, aiormq.exceptions.PublishError)):
            log.warning("broker refused a request: %s", type(exc).__name__)
            pending.publish_failed(str(exc) or type(exc).__name__)
        elif time.monotonic() - first_sent < self._republish_within and not pending.answered:
            # The connection dropped under the publish: send it again once the broker is back.
            self._in_background(self._republish(pending, request, first_sent))
        else:
            pending.publish_failed("the broker connection was lost while publishing")

    async def _republish(self, pending: PendingCall, request: Request, first_sent: float) -> None:
        """Publish again, under a new correlation id, a request whose confirm was lost with the
        connection. The broker may have kept the first copy after all: both ids then lead to this
        call, the first copy to answer wins and the other is cancelled (:meth:`on_reply`)."""
        old = pending.correlation_id
        while not self._broker.ready and self._pending.get(old) is pending:
            if time.monotonic() - first_sent > self._republish_within:
                break
            await asyncio.sleep(0.1)
        if self._pending.get(old) is not pending or pending.abandoned or pending.answered:
            return  # the client went away meanwhile, or the first copy is being answered
        try:
            exchange = self._broker.request_exchange()
        except BrokerUnavailable:
            pending.publish_failed("the broker is unavailable")
            return
        if not pending.copies:
            pending.copies.append(old)
        pending.correlation_id = uuid.uuid4().hex
        pending.copies.append(pending.correlation_id)
        self._send(pending, request, exchange, first_sent)

    def publishing_stalled(self) -> bool:
        """Whether the oldest publish still unconfirmed is older than :attr:`STALLED_AFTER`."""
        for published_at in self._unconfirmed.values():
            return time.monotonic() - published_at > self.STALLED_AFTER
        return False

    def _forget(self, call: PendingCall) -> None:
        copies = call.copies or [call.correlation_id]
        closed = [cid for cid in copies if self._pending.pop(cid, None) is not None]
        if closed:
            self._on_closed(call)
        if call.awaits_report:
            call.drop_unread()  # nobody reads them; the report may be among them
        if call.awaits_report and not call.settled and not self._closing and self._settle_seconds > 0:
            self._settling[call.correlation_id] = (time.monotonic() + self._settle_seconds, call)
            if len(self._settling) > self._settle_calls:
                oldest = next(iter(self._settling))
                self._settling.pop(oldest)[1].settle()
        else:
            call.settle()
        # Also after a failed publish (a confirm lost with the connection may hide a request the
        # broker did take) and when the consumer died mid-answer (the broker hands its copy on).
        if (not call.finished or call.server_gone) and self._broker.control is not None:
            for correlation_id in copies:
                self._in_background(self._send_cancel(correlation_id, call.deadline))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_cancel(self, correlation_id: str, deadline: float) -> None:
        control = self._broker.control
        if control is None:
            return
        message = Cancel(correlation_id, deadline).message()
        with contextlib.suppress(*BROKER_GONE):
            await control.publish(message, routing_key=contract.CANCEL_KEY, mandatory=False)

    def _unreachable_too_long(self, watched: set[str], unreachable: list[str]) -> list[str]:
        """Liveness queues unanswered for ``UNREACHABLE_GONE`` seconds in a row: their node is gone
        (killed), and the consumer with it; a queue that answers again is forgiven."""
        now = time.monotonic()
        for queue in list(self._unreachable_since):
            if queue not in unreachable or queue not in watched:
                del self._unreachable_since[queue]
        for queue in unreachable:
            self._unreachable_since.setdefault(queue, now)
        return [queue for queue, since in self._unreachable_since.items() if now - since >= UNREACHABLE_GONE]

    def replies_lost(self) -> None:
        """End every answer under way with an error at once: the reply queue was lost."""
        pending = [call for call in self._pending.values() if not call.finished]
        if pending:
            log.warning("reply queue lost: %d answers under way end with an error", len(pending))
        for call in pending:
            call.reply_lost()

    async def on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        """Hand a reply piece to the call that awaits it (subscribed to the reply queue)."""
        properties = message.header.properties
        correlation_id = properties.correlation_id or ""
        pending = self._pending.get(correlation_id)
        if pending is None:
            self._reported(correlation_id, properties, message.body)
            return
        if pending.copies:
            self._answered_by(pending, correlation_id)
        try:
            reply = Reply.from_properties(properties, message.body)
        except contract.ContractError as exc:
            log.warning("malformed reply dropped: %s", exc)
            reply = Reply(seq=-1, last=True, error="malformed reply from consumer")
        if not pending.answered:
            pending.answered = True
            self._on_taken(pending)
        delivery = message.delivery
        pending.deliver(reply, again=isinstance(delivery, aiormq.spec.Basic.Deliver) and delivery.redelivered)

    def _reported(self, correlation_id: str, properties: Any, body: bytes) -> None:
        """A piece for a call whose client left: the last one says what the request generated."""
        entry = self._settling.get(correlation_id)
        if entry is None:
            return  # nobody waits for this any more
        try:
            reply = Reply.from_properties(properties, body)
        except contract.ContractError:
            return
        if reply.last:
            call = entry[1]
            call.report(reply)
            if call.final is reply:
                self._settling.pop(correlation_id, None)

    def _settle_overdue(self) -> None:
        """Settle the calls whose report did not come in time, with what is known."""
        now = time.monotonic()
        while self._settling:
            correlation_id, (until, call) = next(iter(self._settling.items()))
            if until > now:
                break
            del self._settling[correlation_id]
            call.settle()

    def _answered_by(self, pending: PendingCall, correlation_id: str) -> None:
        """The copy ``correlation_id`` of a request published more than once answers first: the
        other copies are forgotten and cancelled, wherever they are."""
        for other in pending.copies:
            if other != correlation_id:
                self._pending.pop(other, None)
                self._in_background(self._send_cancel(other, pending.deadline))
        pending.copies = []
        pending.correlation_id = correlation_id

    async def _watch_liveness(self) -> None:
        """End the answers whose consumer connection is gone (its liveness queue no longer exists);
        settle the calls that waited long enough for their report."""
        while True:
            await asyncio.sleep(self._liveness_interval)
            self._settle_overdue()
            watched = {
                call.liveness_queue
                for call in self._pending.values()
                if call.liveness_queue and not call.finished
            }
            if not watched:
                continue
            unreachable: list[str] = []
            try:
                allowed = max(2.0, self._liveness_interval * 2) + liveness.QUEUE_CHECK_TIMEOUT * len(watched)
                async with asyncio.timeout(allowed):
                    gone = await self._broker.vanished(watched, unreachable)
            except asyncio.CancelledError:
                if really_cancelled():
                    raise
                continue  # the connection dropped under the check: again next round
            except Exception as exc:  # disconnected: check again next round
                log.info("liveness check skipped: %s", type(exc).__name__)
                continue
            gone += self._unreachable_too_long(watched, unreachable)
            for queue in gone:
                log.warning("a consumer lost its broker connection in the middle of answers")
                for call in list(self._pending.values()):
                    if call.liveness_queue == queue and not call.finished:
                        call.consumer_gone()
