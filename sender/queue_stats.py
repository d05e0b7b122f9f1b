"""Depth and consumer count of each model queue, as admission needs them: cheap and nearly fresh.

A passive declare of the model queue says whether the model exists, whether a
consumer is attached and how many requests wait. Asking on every request would
add a broker round trip to each, so the numbers are cached for ``ttl``; while
requests for a model keep coming, a background task keeps them fresh, and
requests never wait for the broker. Between two reads this sender counts its
own requests as queued from their publish to their first reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiormq
import aiormq.abc

import contract
from contract.errors import BROKER_GONE
from sender.broker import Broker, BrokerUnavailable, really_cancelled

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QueueStats:
    exists: bool
    messages: int
    consumers: int


class QueueStatsCache:
    """The last numbers read for each model queue, kept fresh while the model is in use."""

    WATCH_IDLE = 5.0
    """Seconds without a request after which a model's numbers are no longer kept fresh."""

    def __init__(
        self, broker: Broker, *, ttl: float, on_read: Callable[[str, QueueStats], None] = lambda *_: None
    ) -> None:
        self._broker = broker
        self._ttl = ttl
        self._on_read = on_read
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._stats: dict[str, tuple[float, QueueStats]] = {}
        """model -> (monotonic time fetched, stats)"""
        self._used: dict[str, float] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._pending: dict[str, asyncio.Future[QueueStats]] = {}
        self._fresh_pending: dict[str, asyncio.Future[QueueStats]] = {}

    def close(self) -> None:
        for watcher in list(self._watchers.values()):
            watcher.cancel()

    async def get(self, model: str, *, fresh: bool = False, watch: bool = True) -> QueueStats:
        """The model queue's numbers, about ``ttl`` old; :class:`BrokerUnavailable` if unknown and
        the broker cannot be asked.

        The first request after a quiet spell (and any request for a model without
        a queue) waits for a passive declare, shared by all requests arriving
        meanwhile. ``fresh`` asks for numbers read after the call. ``watch=False`` (the model
        list) neither starts nor prolongs keeping the numbers fresh: only requests do.
        """
        now = time.monotonic()
        if watch:
            self._used[model] = now
        cached = None if fresh else self._stats.get(model)
        if cached is not None:
            fetched_at, stats = cached
            if now - fetched_at < self._ttl or (stats.exists and model in self._watchers):
                return stats
        pending = self._fresh_pending if fresh else self._pending
        task = pending.get(model)
        if task is None:
            task = asyncio.ensure_future(self._fetch(model))
            pending[model] = task
            task.add_done_callback(lambda _: pending.pop(model, None))
        stats = await asyncio.shield(task)
        if watch and stats.exists and model not in self._watchers:
            self._watchers[model] = asyncio.create_task(self._watch(model))
        return stats

    def published(self, model: str) -> None:
        """This sender queued a request for ``model``."""
        self._adjust_depth(model, +1)

    def taken(self, model: str) -> None:
        """A consumer took one of this sender's requests for ``model`` off the queue."""
        self._adjust_depth(model, -1)

    def _adjust_depth(self, model: str, change: int) -> None:
        """Keep the cached depth close between two reads. Counting publishes alone would let the
        estimate climb by the request rate times the read interval and refuse tokens whose
        threshold the real queue never reached."""
        cached = self._stats.get(model)
        if cached is not None:
            stats = cached[1]
            depth = max(0, stats.messages + change)
            self._stats[model] = (cached[0], QueueStats(stats.exists, depth, stats.consumers))

    async def _watch(self, model: str) -> None:
        try:
            while time.monotonic() - self._used.get(model, 0.0) < self.WATCH_IDLE:
                await asyncio.sleep(self._ttl)
                try:
                    stats = await self._fetch(model)
                except Exception as exc:
                    log.warning("queue stats of %s failed: %s", model, type(exc).__name__)
                    return
                if not stats.exists:
                    return
        finally:
            self._watchers.pop(model, None)

    async def _fetch(self, model: str) -> QueueStats:
        try:
            return await self._read(model)
        except asyncio.CancelledError:
            if really_cancelled():
                raise
            raise BrokerUnavailable("connection lost") from None
        except BROKER_GONE as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc

    async def _read(self, model: str) -> QueueStats:
        async with self._lock:
            channel = await self._underlay()
            try:
                declared = await channel.queue_declare(contract.model_queue(model), passive=True, timeout=5)
            except aiormq.exceptions.ChannelNotFoundEntity:
                await self._drop_channel()
                stats = QueueStats(exists=False, messages=0, consumers=0)
            else:
                assert declared is not None
                stats = QueueStats(
                    exists=True,
                    messages=declared.message_count or 0,
                    consumers=declared.consumer_count or 0,
                )
        self._stats[model] = (time.monotonic(), stats)
        if stats.exists:
            self._on_read(model, stats)
        if len(self._stats) > 10_000:
            self._stats.clear()
            self._used.clear()
        return stats

    async def _underlay(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._broker.open_channel()
        return self._channel

    async def _drop_channel(self) -> None:
        """The broker closed the channel (NOT_FOUND); make sure our side is closed too."""
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):  # already closed by the broker
                await channel.close()
