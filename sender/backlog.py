"""Each token's own requests as this sender knows them: waiting, in flight, and how fast they go.

Fair share, the per-token parallel limit and admission by one's own backlog
all read these numbers. A request counts as *waiting* from its publish to its
first reply piece (a consumer took it off the queue) or its end, and as *in
flight* from its publish to its end. Start and finish times of the last
``window`` seconds give the service rates that ``Retry-After`` is computed
from. Everything is this replica's view: with several senders each counts the
requests it published itself. Nothing here touches the broker or the
database; each event costs a few dictionary operations.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Count:
    waiting: int = 0
    in_flight: int = 0
    events: deque[float] = field(default_factory=lambda: deque(maxlen=_EVENTS))
    """Monotonic times of the last starts (per model and token) or ends (per token)."""


_EVENTS = 256
"""Events remembered per key: enough for a rate, bounded memory per token."""


class Backlog:
    """Waiting and in-flight requests per (model, token), in flight and finished per token."""

    def __init__(self, *, window: float = 30.0, max_keys: int = 10_000) -> None:
        self._window = window
        self._max_keys = max_keys
        self._by_model: dict[tuple[str, str], _Count] = {}
        """(model, token) -> requests waiting for that model, and their recent starts."""
        self._by_token: dict[str, _Count] = {}
        """token -> requests in flight over every model, and their recent ends."""
        self._model_starts: dict[str, deque[float]] = {}

    def waiting(self, model: str, token: str) -> int:
        """Requests of ``token`` for ``model`` published by this sender and not yet started."""
        count = self._by_model.get((model, token))
        return count.waiting if count is not None else 0

    def in_flight(self, token: str) -> int:
        """Requests of ``token`` published by this sender and not yet ended (waiting or running)."""
        count = self._by_token.get(token)
        return count.in_flight if count is not None else 0

    def published(self, model: str, token: str) -> None:
        if len(self._by_model) > self._max_keys or len(self._by_token) > self._max_keys:
            self._forget_idle()
        self._by_model.setdefault((model, token), _Count()).waiting += 1
        self._by_token.setdefault(token, _Count()).in_flight += 1

    def started(self, model: str, token: str) -> None:
        """The request's first reply piece came: a consumer took it off the queue."""
        now = time.monotonic()
        count = self._by_model.get((model, token))
        if count is not None:
            count.waiting = max(0, count.waiting - 1)
            count.events.append(now)
        self._model_starts.setdefault(model, deque(maxlen=_EVENTS)).append(now)

    def ended(self, model: str, token: str, *, started: bool) -> None:
        """The call is closed (answered, failed, cancelled); ``started`` if a consumer had taken it."""
        if not started:
            count = self._by_model.get((model, token))
            if count is not None:
                count.waiting = max(0, count.waiting - 1)
        flight = self._by_token.get(token)
        if flight is not None:
            flight.in_flight = max(0, flight.in_flight - 1)
            flight.events.append(time.monotonic())

    def start_rate(self, model: str, token: str | None = None) -> float:
        """Requests per second that started recently: ``token``'s for ``model``, or all of this
        sender's for ``model``; 0 if none did within the window."""
        if token is None:
            return self._rate(self._model_starts.get(model))
        count = self._by_model.get((model, token))
        return self._rate(count.events if count is not None else None)

    def end_rate(self, token: str) -> float:
        """Requests of ``token`` per second that ended recently (over every model)."""
        count = self._by_token.get(token)
        return self._rate(count.events if count is not None else None)

    def _rate(self, events: deque[float] | None) -> float:
        if not events:
            return 0.0
        now = time.monotonic()
        recent = [t for t in events if now - t <= self._window]
        if not recent:
            return 0.0
        # Over the window, or since the first event if the token only just began (but not from a
        # single instant: one event in a burst is not an infinite rate).
        span = max(now - recent[0], min(self._window, 1.0))
        return len(recent) / span

    def _forget_idle(self) -> None:
        """Drop the keys with nothing waiting or in flight: the tables stay bounded."""
        self._by_model = {key: c for key, c in self._by_model.items() if c.waiting}
        self._by_token = {key: c for key, c in self._by_token.items() if c.in_flight}
        if len(self._model_starts) > self._max_keys:
            self._model_starts.clear()


def expected_wait(ahead: float, rate: float, *, floor: int, ceiling: int) -> int:
    """Whole seconds until ``ahead`` requests are served at ``rate`` per second, within
    ``floor`` and ``ceiling``; ``floor`` when nothing is known of the rate."""
    if rate <= 0 or ahead <= 0:
        return floor
    return max(floor, min(ceiling, math.ceil(ahead / rate)))
