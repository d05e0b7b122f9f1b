"""Bearer tokens: how secrets are hashed, and the cached lookup.

Secrets are random strings that clients present as ``Authorization: Bearer``.
Only their SHA-256 (hex) is stored: tokens are high-entropy, so a slow password
hash would buy nothing, and SHA-256 can be computed by the stock SQL clients of
both databases (``SHA2(x, 256)`` in MySQL, ``sha256()`` in PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from sender.tables import tokens_table

log = logging.getLogger(__name__)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A fresh secret: 256 random bits, URL-safe, with the ``sk-`` prefix OpenAI clients expect."""
    return "sk-" + secrets.token_urlsafe(32)


def parse_models(text: str | None) -> list[str] | None:
    """``allowed_models`` as stored (comma-separated), in order; None means every model."""
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    return names or None


def format_models(models: Iterable[str] | None) -> str | None:
    """``allowed_models`` as stored: the names comma-separated; None (every model) for none."""
    text = ",".join(models or ())
    return text or None


@dataclass(frozen=True, slots=True)
class Token:
    """What the sender needs to know about a caller. Never holds the secret."""

    name: str
    priority: int
    threshold: int
    """Queue depth of the model at or beyond which this token's requests get 429."""
    id: int = 0
    enabled: bool = True
    expires: float | None = None
    """``time.monotonic()`` value after which the token no longer works, if it expires."""
    models: frozenset[str] | None = None
    """Models this token may use; None means all."""
    rpm: int | None = None
    tpm: int | None = None
    max_seconds: float | None = None
    """The longest a request of this token may take; None: the server's deadline."""

    def deadline_seconds(self, server_default: float) -> float:
        """How long a request of this token may take: the token can shorten the server's
        deadline (a batch client that would rather give up early) but never extend it, so
        one token cannot hold a GPU slot or a reply queue longer than the operator allows."""
        if self.max_seconds is None or not self.max_seconds > 0:  # NaN or <= 0: not a usable limit
            return server_default
        return min(server_default, self.max_seconds)

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.monotonic() if now is None else now) >= self.expires

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class TokenUnavailable(Exception):
    """The token database could not be asked, and nothing usable is cached for this token."""


class TokenStore:
    """Looks tokens up by hash, with a TTL cache in front of the database.

    Lookups that miss the cache are answered in batches: one query (``WHERE
    token_hash IN (...)``) serves every miss that arrived while the previous
    one ran. Tokens used within the last minute are re-read in the background
    shortly before their entry expires (up to 500 in one query), so requests
    of known tokens do not wait for the database, a token is re-read about
    once per TTL, and a change reaches the cache within the TTL. Unknown
    tokens are cached too (shorter), so a client hammering with a bad key does
    not reach the database on every request; the cache is bounded (LRU).
    When the database cannot be reached, a token seen within ``stale_ttl``
    keeps working from its cached entry (asked for again at most every
    second), so a short outage does not stop traffic; an unknown one raises
    :class:`TokenUnavailable`.
    """

    MAX_BATCH = 500
    KEEP_WARM = 60.0
    """Seconds after its last use that a token is still kept fresh in the background."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        ttl: float,
        negative_ttl: float,
        max_entries: int,
        stale_ttl: float = 3600.0,
        timeout: float = 2.0,
        on_query: Callable[[], None] = lambda: None,
    ) -> None:
        self._engine = engine
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._stale_ttl = stale_ttl
        self._timeout = timeout
        self._retry = min(ttl, 1.0)
        self._on_query = on_query
        self._cache: OrderedDict[str, tuple[float, float, Token | None]] = OrderedDict()
        """hash -> (fresh until, usable until during an outage, token or None if unknown)"""
        self._waiting: dict[str, asyncio.Future[Token | None]] = {}
        """Misses not yet answered: hash -> what their lookups await."""
        self._queued: list[str] = []
        """Misses for the next query."""
        self._worker: asyncio.Task[None] | None = None
        self._used: dict[str, float] = {}
        """Known tokens -> when last used; those used within ``KEEP_WARM`` are re-read before they expire."""
        self._refresher: asyncio.Task[None] | None = None
        self._warned_at = float("-inf")

    def start(self) -> None:
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def close(self) -> None:
        for task in (self._refresher, self._worker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @property
    def warm(self) -> bool:
        """Whether some token is cached, so that traffic can go on while the database is away."""
        return any(entry[2] is not None for entry in reversed(self._cache.values()))

    async def lookup(self, secret: str) -> Token | None:
        """The token whose secret this is, None if there is none; :class:`TokenUnavailable` if the
        database cannot say and nothing usable is cached."""
        key = hash_secret(secret)
        entry = self._cache.get(key)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            if entry[2] is not None:
                self._used[key] = now
            return entry[2]
        future = self._waiting.get(key)
        if future is None:
            future = self._waiting[key] = asyncio.get_running_loop().create_future()
            self._queued.append(key)
            if self._worker is None:
                self._worker = asyncio.create_task(self._answer_misses())
        return await asyncio.shield(future)

    async def _answer_misses(self) -> None:
        try:
            while self._queued:
                keys, self._queued = self._queued[: self.MAX_BATCH], self._queued[self.MAX_BATCH :]
                try:
                    async with asyncio.timeout(self._timeout):
                        found = await self._query(keys)
                except Exception as exc:
                    self._unreachable(keys, exc)
                else:
                    self._answer(keys, found)
        finally:
            self._worker = None

    async def _refresh_loop(self) -> None:
        period = min(1.0, self._ttl / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            # Those that would expire before the next round: re-read now, so no request waits.
            due, idle = [], []
            for key, used in self._used.items():
                entry = self._cache.get(key)
                if entry is None or now - used > self.KEEP_WARM:
                    idle.append(key)
                elif entry[0] - now < period:
                    due.append(key)
            for key in idle:
                del self._used[key]
            for start in range(0, len(due), self.MAX_BATCH):
                keys = due[start : start + self.MAX_BATCH]
                try:
                    async with asyncio.timeout(self._timeout):
                        found = await self._query(keys)
                except Exception as exc:
                    self._warn(exc)
                    break  # the entries expire; lookups then go through the outage path
                self._answer(keys, found)

    def _answer(self, keys: list[str], found: dict[str, Token]) -> None:
        now = time.monotonic()
        for key in keys:
            token = found.get(key)
            ttl = self._ttl if token is not None else self._negative_ttl
            self._cache[key] = (now + ttl, now + self._stale_ttl, token)
            self._cache.move_to_end(key)
            if token is not None and key in self._waiting:
                self._used[key] = now  # asked for by a request, not only refreshed
            self._settle(key, token)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    def _unreachable(self, keys: list[str], exc: Exception) -> None:
        now = time.monotonic()
        served = 0
        for key in keys:
            entry = self._cache.get(key)
            if entry is None or entry[2] is None or entry[1] <= now:
                self._settle(key, TokenUnavailable(type(exc).__name__))
                continue
            self._cache[key] = (now + self._retry, entry[1], entry[2])
            self._settle(key, entry[2])
            served += 1
        if served:
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        """At most one warning every 10 s: an outage must not flood the log."""
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            log.warning("token database unreachable (%s); serving cached tokens", type(exc).__name__)

    def _settle(self, key: str, outcome: Token | Exception | None) -> None:
        future = self._waiting.pop(key, None)
        if future is None or future.done():
            return
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
            future.exception()  # retrieved by whoever awaits it; do not warn when nobody does
        else:
            future.set_result(outcome)

    async def _query(self, keys: list[str]) -> dict[str, Token]:
        t = tokens_table.c
        statement = sa.select(
            t.id,
            t.name,
            t.token_hash,
            t.priority,
            t.threshold,
            t.enabled,
            t.expires_at,
            t.allowed_models,
            t.rpm_limit,
            t.tpm_limit,
            t.max_seconds,
            sa.func.localtimestamp().label("db_now"),
        ).where(t.token_hash.in_(keys))
        self._on_query()
        async with self._engine.connect() as conn:
            rows = (await conn.execute(statement)).all()
        found = {}
        for row in rows:
            models = parse_models(row.allowed_models)
            expires = None
            if row.expires_at is not None:
                # Both times come from the database's clock and zone, so their difference is exact.
                expires = time.monotonic() + (row.expires_at - row.db_now).total_seconds()
            found[row.token_hash] = Token(
                id=row.id,
                name=row.name,
                priority=row.priority,
                threshold=row.threshold,
                enabled=bool(row.enabled),
                expires=expires,
                models=frozenset(models) if models else None,
                rpm=row.rpm_limit,
                tpm=row.tpm_limit,
                max_seconds=row.max_seconds,
            )
        return found
