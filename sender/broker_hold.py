"""Holding requests through a short broker outage: it costs them latency, not an error.

When the broker cannot be asked (a node restarting, a reconnect under way, the
consumers not back yet, publishes no longer confirmed), a request is held and
tried again once the broker is back: for at most ``SENDER_BROKER_WAIT`` seconds,
never past the request's own deadline, and for at most ``SENDER_BROKER_WAIT_MAX``
requests at once, so that an outage that lasts does not pile up clients and
memory. A client that disconnects meanwhile is let go at once. Past those
bounds the request gets the 503 (with ``Retry-After``) it would have got at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive

from contract import errors
from sender.broker import Broker
from sender.errors import ApiError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Retry(Exception):
    """The broker could not serve this attempt now; ``error`` is what the client gets if the hold ends."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class BrokerHold:
    POLL_SECONDS = 0.1
    """How often a held request looks whether the broker is back."""

    def __init__(self, broker: Broker, *, seconds: float, max_held: int) -> None:
        self._broker = broker
        self._seconds = seconds
        self._max_held = max_held
        self.held = 0
        """Requests held right now."""

    def recently_reconnected(self) -> bool:
        """Whether the broker went away or came back within the hold time: consumers may still be
        reconnecting."""
        return time.monotonic() - self._broker.disturbed_at < self._seconds

    async def attempt(
        self, step: Callable[[], Awaitable[T]], *, receive: Receive, deadline: float, since: float
    ) -> T:
        """``step``'s result; while it raises :class:`Retry`, ``step`` again once the broker is ready,
        within the bounds: ``SENDER_BROKER_WAIT`` from ``since`` (monotonic: when the request first
        asked the broker, so that admission and publishing share one allowance) and the request's
        ``deadline`` (``time.time()``). ``receive`` is its connection's, the body already read."""
        try:
            return await step()
        except Retry as refused:
            error = refused.error
        if self._seconds <= 0 or self.held >= self._max_held:
            raise error
        self.held += 1
        until = min(since + self._seconds, time.monotonic() + deadline - time.time())
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    # The broker's fault, not the request's: 503 with Retry-After, even at the deadline.
                    log.warning("broker still unavailable after holding a request")
                    raise error
                await asyncio.wait({gone}, timeout=min(self.POLL_SECONDS, left))
                if gone.done():
                    raise ApiError(errors.CLIENT_DISCONNECTED)
                if not self._broker.ready:
                    continue
                try:
                    return await step()
                except Retry as refused:
                    error = refused.error
        finally:
            self.held -= 1
            gone.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
