"""Start-up wiring: every long-lived part of the sender, built, started and stopped in one place.

The routes and the forwarding front reach all of it through one
:class:`Services`, built once per process by the app's lifespan, so that
nothing is created per request and the order of start and stop is written once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from sender.accounting import Accounting
from sender.admission import Admission
from sender.backlog import Backlog
from sender.broker import Broker
from sender.broker_hold import BrokerHold
from sender.calls import Calls, PendingCall
from sender.database import create_engine
from sender.limits import RateLimiter
from sender.metrics import SenderMetrics
from sender.metrics_server import MetricsServer
from sender.migrate import kind_of, schema_scripts, schema_version
from sender.queue_stats import QueueStatsCache
from sender.registry import ModelRegistry
from sender.relay import Relay
from sender.settings import SenderSettings
from sender.tokens import SecretHasher, TokenStore
from sender.usage_rows import UsageRecorder

log = logging.getLogger(__name__)


class Services:
    """What the routes need, built once per process."""

    def __init__(self, settings: SenderSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine = create_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            pool_pre_ping=True,
            pool_recycle=1800,
        )
        self.registry = ModelRegistry(settings.max_priority, settings.configured_models())
        self.metrics = SenderMetrics(token_label=settings.metrics_token_label)
        pepper = settings.pepper()
        if pepper is None:
            log.warning(
                "no SENDER_TOKEN_PEPPER(_FILE): token hashes are plain SHA-256, safe only for long "
                "random secrets; a pepper is strongly recommended"
            )
        self.tokens = TokenStore(
            self.engine,
            ttl=settings.token_cache_seconds,
            negative_ttl=settings.unknown_token_cache_seconds,
            max_entries=settings.token_cache_size,
            negative_entries=settings.unknown_token_cache_size,
            hasher=SecretHasher(pepper, accept_legacy=settings.token_legacy_hashes),
            stale_ttl=settings.token_stale_seconds,
            timeout=settings.db_timeout_seconds,
            on_query=self.metrics.token_queries.inc,
        )
        self.limiter = RateLimiter(
            self.engine,
            sync_seconds=settings.rate_sync_seconds,
            timeout=settings.db_timeout_seconds,
            max_model_len=self.registry.max_model_len,
        )
        self.usage = UsageRecorder(
            self.engine,
            flush_seconds=settings.usage_flush_seconds,
            max_rows=settings.usage_buffer_rows,
            on_dropped=self.metrics.usage_rows_dropped.inc,
            on_written=self.metrics.usage_rows_written.inc,
        )
        self.broker = Broker(
            settings.rabbitmq_urls,
            reconnect_interval=settings.broker_reconnect_seconds,
            ssl_context=settings.rabbitmq_ssl_context(),
            models=settings.configured_models(),
            max_priority=settings.max_priority,
            queue_type=settings.queue_type,
        )
        self.queue_stats = QueueStatsCache(
            self.broker, ttl=settings.queue_stats_seconds, on_read=self.metrics.queue_read
        )
        self.backlog = Backlog()
        self.calls = Calls(
            self.broker,
            on_published=self._published,
            on_taken=self._taken,
            on_closed=self._closed,
            liveness_interval=settings.liveness_seconds,
            settle_seconds=settings.settle_seconds,
            max_buffered=settings.max_buffered_reply_bytes,
            on_overflow=self.metrics.stopped_answers.inc,
            republish_within=settings.broker_wait,
        )
        self.hold = BrokerHold(self.broker, seconds=settings.broker_wait, max_held=settings.broker_wait_max)
        self.admission = Admission(
            self.tokens,
            self.queue_stats,
            self.limiter,
            settings,
            self.hold,
            declare=self.broker.declare_model_queue,
            backlog=self.backlog,
            announced=lambda model: self.registry.card(model) is not None,
            shared=self.registry.shared,
        )
        self.relay = Relay(self.calls, self.backlog, self.hold, settings, has_consumer=self._has_consumer)
        self.accounting = Accounting(
            self.metrics, self.limiter, self.usage, usage_rows=settings.usage_accounting
        )
        self.metrics.broker_connected.set_function(lambda: 1.0 if self.broker.connected else 0.0)
        self.metrics.buffered_reply_bytes.set_function(lambda: float(self.calls.buffered.bytes))
        self.metrics.broker_held.set_function(lambda: float(self.hold.held))
        self._db_checked_at = 0.0
        self._db_ok = False
        self.metrics_server: MetricsServer | None = None

    def _published(self, call: PendingCall) -> None:
        self.queue_stats.published(call.model)
        self.backlog.published(call.model, call.owner)

    def _taken(self, call: PendingCall) -> None:
        self.queue_stats.taken(call.model)
        self.backlog.started(call.model, call.owner)

    def _closed(self, call: PendingCall) -> None:
        self.backlog.ended(call.model, call.owner, started=call.answered)

    async def start(self) -> None:
        if self.settings.metrics_port:
            # First: a port already taken stops the start here, before anything else is opened.
            self.metrics_server = MetricsServer(
                self.metrics.registry, self.settings.metrics_host, self.settings.metrics_port
            )
            log.info("metrics at http://%s:%d/metrics", self.settings.metrics_host, self.metrics_server.port)
        await self.broker.connect(
            on_reply=self.calls.on_reply,
            on_announcement=self.registry.receive,
            on_reconnect=self.metrics.broker_reconnects.inc,
            on_replies_lost=self.calls.replies_lost,
        )
        self.calls.start()
        await _check_schema(self.engine)
        self.tokens.start()
        self.limiter.start()
        self.usage.start()
        # Consumers answer the roll call within milliseconds; waiting a moment
        # means the first /v1/models after start is already complete.
        await asyncio.sleep(self.settings.rollcall_wait_seconds)

    async def close(self) -> None:
        await self.calls.wait_settled(min(2.0, self.settings.settle_seconds))
        self.calls.close()
        self.queue_stats.close()
        await self.broker.close()
        await self.usage.close()
        await self.limiter.close()
        await self.tokens.close()
        await self.engine.dispose()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.close)

    async def waiting(self, models: list[str]) -> frozenset[str]:
        """Which of these models have requests waiting in their queue (read at most ``ttl`` ago)."""

        async def waits(model: str) -> bool:
            try:
                return (await self.queue_stats.get(model, watch=False)).messages > 0
            except Exception:
                return False  # the broker cannot say: shown as sleeping

        found = await asyncio.gather(*(waits(model) for model in models))
        return frozenset(model for model, wait in zip(models, found, strict=True) if wait)

    async def _has_consumer(self, model: str) -> bool:
        """Whether ``model``'s queue has a live consumer now (when the broker cannot say: yes)."""
        try:
            return (await self.queue_stats.get(model, fresh=True)).consumers > 0
        except Exception as exc:
            log.info("could not read the queue of %s: %s", model, type(exc).__name__)
            return True

    async def database_reachable(self) -> bool:
        if time.monotonic() - self._db_checked_at < 1.0:
            return self._db_ok
        try:
            async with asyncio.timeout(2.0), self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
            self._db_ok = True
        except Exception as exc:
            log.warning("token database unreachable: %s", type(exc).__name__)
            self._db_ok = False
        self._db_checked_at = time.monotonic()
        return self._db_ok


async def _check_schema(engine: AsyncEngine) -> None:
    """Say plainly when the database was not migrated: every lookup would fail otherwise, unexplained."""
    try:
        async with asyncio.timeout(5):
            version = await schema_version(engine)
        expected = schema_scripts(kind_of(engine))[-1].version
    except Exception as exc:
        log.warning("could not read the token database's schema version: %s", type(exc).__name__)
        return
    if version < expected:
        log.error(
            "the token database is at schema version %d, this sender needs %d: "
            "run `python -m sender.admin migrate`",
            version,
            expected,
        )
