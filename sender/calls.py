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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiormq.abc

import contract
from contract import Cancel, Reply, Request, liveness
from contract.errors import BROKER_GONE
from sender.broker import Broker, BrokerUnavailable, really_cancelled

log = logging.getLogger(__name__)

UNREACHABLE_GONE = 3.0
"""Seconds a consumer's liveness queue may stay unreachable (its node killed: the cluster waits for
the node and answers nothing) before its answers end with an error."""


class PublishFailed(Exception):
    """The broker did not take a request (no connection, no such queue, or a nack)."""


class PendingCall:
    """The replies to one published request, in order, as they arrive."""

    def __init__(
        self, correlation_id: str, model: str, deadline: float, on_done: Callable[[PendingCall], None]
    ) -> None:
        self.correlation_id = correlation_id
        self.model = model
        self.deadline = deadline
        self._replies: asyncio.Queue[Reply] = asyncio.Queue()
        self._on_done = on_done
        self._expected_seq = 0
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

    def deliver(self, reply: Reply) -> None:
        self._replies.put_nowait(reply)

    def publish_failed(self, error: str) -> None:
        self.publish_error = error
        self.deliver(Reply(seq=self._expected_seq, last=True, error=error))

    async def next(self, wait: float) -> Reply:
        """The next piece of the answer; ``TimeoutError`` if none comes in time.

        A gap in the sequence means a piece was lost in the broker: the answer
        cannot be trusted any more, so it ends with an error instead.
        """
        async with asyncio.timeout(max(wait, 0.0)):
            while True:
                reply = await self._replies.get()
                if self.abandoned or self.publish_error is not None:
                    return reply
                if reply.liveness_queue is not None:
                    if self.liveness_queue is None:
                        self.liveness_queue = reply.liveness_queue  # the first consumer to answer owns it
                    elif reply.liveness_queue != self.liveness_queue:
                        continue  # a redelivered copy served by another consumer: the first answer stands
                return self._check(reply)

    def _check(self, reply: Reply) -> Reply:
        if reply.seq != self._expected_seq:
            return Reply(seq=reply.seq, last=True, error=f"reply piece {self._expected_seq} was lost")
        self._expected_seq += 1
        self.finished = reply.last
        if reply.last:
            self.final = reply
        return reply

    def consumer_gone(self) -> None:
        """The consumer serving the answer lost its broker connection: the answer will not go on."""
        self.server_gone = True
        self.deliver(
            Reply(
                seq=self._expected_seq,
                last=True,
                error="the model server stopped in the middle of the answer",
                liveness_queue=self.liveness_queue,
            )
        )

    def reply_lost(self) -> None:
        """The reply queue was lost with what it held: the answer will not come (or not whole)."""
        if self.finished:
            return
        self.server_gone = True
        self.deliver(
            Reply(
                seq=self._expected_seq,
                last=True,
                error="the answer was lost: this dispatcher's reply queue was removed",
                liveness_queue=self.liveness_queue,
            )
        )

    def abandon(self, reason: str = "the client went away") -> None:
        """Nobody will read the answer: end the wait for it now."""
        self.abandoned = True
        self.deliver(Reply(seq=self._expected_seq, last=True, error=reason))

    def close(self) -> None:
        """Stop listening; an unfinished request is cancelled wherever it is (queued or running)."""
        self._on_done(self)


class Calls:
    """Every request this sender published and still awaits replies for."""

    def __init__(
        self,
        broker: Broker,
        *,
        on_published: Callable[[str], None] = lambda _: None,
        on_taken: Callable[[str], None] = lambda _: None,
        liveness_interval: float = 1.0,
        confirm_timeout: float = 10.0,
    ) -> None:
        """``on_published`` and ``on_taken`` hear of a model's request when it is published and when
        its first reply shows that a consumer took it off the queue."""
        self._broker = broker
        self._on_published = on_published
        self._on_taken = on_taken
        self._liveness_interval = liveness_interval
        self._confirm_timeout = confirm_timeout
        self._pending: dict[str, PendingCall] = {}
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

    def publish(self, model: str, request: Request) -> PendingCall:
        """Publish ``request`` to the model's queue and return where its replies will arrive.

        The publisher confirm is awaited alongside the answer rather than before it;
        a nack or a return (no such queue) ends the call with :attr:`PendingCall.publish_error`.
        """
        try:
            exchange = self._broker.request_exchange()
        except BrokerUnavailable as exc:
            raise PublishFailed(str(exc)) from exc
        correlation_id = uuid.uuid4().hex
        request = dataclasses.replace(
            request, correlation_id=correlation_id, reply_to=self._broker.reply_queue_name
        )
        pending = PendingCall(correlation_id, model, request.deadline, self._forget)
        self._pending[correlation_id] = pending
        confirm = asyncio.ensure_future(
            exchange.publish(request.message(), routing_key=contract.model_queue(model), mandatory=True)
        )
        # A confirm lost with its connection must not leave the client waiting until the deadline.
        overdue = asyncio.get_running_loop().call_later(self._confirm_timeout, confirm.cancel)
        confirm.add_done_callback(lambda done: self._confirmed(pending, done, overdue))
        self._on_published(model)
        return pending

    def _confirmed(
        self, pending: PendingCall, confirm: asyncio.Future[Any], overdue: asyncio.TimerHandle
    ) -> None:
        overdue.cancel()
        if confirm.cancelled():
            pending.publish_failed("publishing was cancelled")
            return
        exc = confirm.exception()
        if exc is not None:
            log.warning("broker refused a request: %s", type(exc).__name__)
            pending.publish_failed(str(exc) or type(exc).__name__)

    def _forget(self, call: PendingCall) -> None:
        self._pending.pop(call.correlation_id, None)
        # Also after a failed publish (a confirm lost with the connection may hide a request the
        # broker did take) and when the consumer died mid-answer (the broker hands its copy on).
        if (not call.finished or call.server_gone) and self._broker.control is not None:
            task = asyncio.ensure_future(self._send_cancel(call))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_cancel(self, call: PendingCall) -> None:
        control = self._broker.control
        assert control is not None
        message = Cancel(call.correlation_id, call.deadline).message()
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
        pending = self._pending.get(properties.correlation_id or "")
        if pending is None:
            return  # the client gave up; nobody waits for this any more
        try:
            reply = Reply.from_properties(properties, message.body)
        except contract.ContractError as exc:
            log.warning("malformed reply dropped: %s", exc)
            reply = Reply(seq=-1, last=True, error="malformed reply from consumer")
        if not pending.answered:
            pending.answered = True
            self._on_taken(pending.model)
        pending.deliver(reply)

    async def _watch_liveness(self) -> None:
        """End the answers whose consumer connection is gone (its liveness queue no longer exists)."""
        while True:
            await asyncio.sleep(self._liveness_interval)
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
