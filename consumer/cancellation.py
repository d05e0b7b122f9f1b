"""Which requests this consumer must stop, and why: the state cancellation shares between worker and serving.

A request is stopped for one of three reasons that end differently: its client
went away (the message is acked; only a last piece with the tokens generated
so far is sent, for accounting), a piece of its answer was lost on the way to
the sender (acked, nothing more is sent), the broker connection dropped (the
broker hands the message to another consumer, so it is not settled at all), or
the consumer is shutting down past its grace period (an answer under way ends
with an error and its token counts; one not started yet is given back like a
lost delivery). The worker records the reason when it cancels the task serving
the request; serving reads it when the cancellation reaches it.
A cancellation for a request not delivered yet is remembered until its
deadline, so the request is skipped when it comes up.
"""

from __future__ import annotations

import asyncio
import enum
import time

_MEMORY_SIZE = 100_000
"""Cancellations remembered for requests not seen yet, beyond which expired ones are forgotten."""


class Why(enum.Enum):
    CLIENT_GONE = "client gone"
    DELIVERY_LOST = "delivery lost"
    """The broker connection dropped: the broker gives the request to another consumer."""
    SHUTDOWN = "shutdown"
    """The consumer is stopping and its grace period ran out: the answer ends with an error."""
    REPLY_LOST = "reply lost"
    """A reply piece did not reach the sender's reply queue (gone, or refused): nobody gets the rest."""


class Cancellations:
    def __init__(self) -> None:
        self._serving: dict[str, asyncio.Task[object]] = {}
        """correlation id -> the task serving it."""
        self._why: dict[str, Why] = {}
        self._early: dict[str, float] = {}
        """Cancelled before they reached this consumer: correlation id -> forget after (monotonic)."""

    def track(self, correlation_id: str, task: asyncio.Task[object]) -> None:
        self._serving[correlation_id] = task

    def untrack(self, correlation_id: str) -> None:
        self._serving.pop(correlation_id, None)

    def client_gone(self, correlation_id: str, forget_in: float) -> None:
        """Stop serving this request, or skip it when it comes up within ``forget_in`` seconds."""
        task = self._serving.get(correlation_id)
        if task is not None:
            self._why.setdefault(correlation_id, Why.CLIENT_GONE)
            task.cancel()
            return
        now = time.monotonic()
        self._early[correlation_id] = now + forget_in
        if len(self._early) > _MEMORY_SIZE:
            self._early = {cid: until for cid, until in self._early.items() if until > now}

    def reply_lost(self, correlation_id: str) -> None:
        """Stop serving this request: a piece of its answer was lost on the way to the sender."""
        task = self._serving.get(correlation_id)
        if task is not None:
            self._why.setdefault(correlation_id, Why.REPLY_LOST)
            task.cancel()

    def delivery_lost(self) -> int:
        """The broker channel or connection dropped: stop every request in flight; how many were stopped.

        Heard both from the connection and from the consume channel: a request stopped once is not
        cancelled again (its serving uncancels its task once)."""
        stopped = 0
        for correlation_id, task in list(self._serving.items()):
            if self._why.get(correlation_id) is Why.DELIVERY_LOST:
                continue
            self._why[correlation_id] = Why.DELIVERY_LOST
            task.cancel()
            stopped += 1
        return stopped

    def shutting_down(self) -> None:
        """The grace period ran out: stop every request in flight, each ending its answer with an error."""
        for correlation_id, task in list(self._serving.items()):
            self._why.setdefault(correlation_id, Why.SHUTDOWN)
            task.cancel()

    def skip(self, correlation_id: str) -> bool:
        """Whether this request was cancelled before it arrived (then it is forgotten)."""
        return self._early.pop(correlation_id, None) is not None

    def why(self, correlation_id: str) -> Why | None:
        """Why the task serving this request was cancelled (None: not by the consumer); asked once."""
        return self._why.pop(correlation_id, None)
