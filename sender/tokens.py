"""Bearer tokens: how secrets are hashed, and the cached lookup.

Secrets are random strings that clients present as ``Authorization: Bearer``.
Only their SHA-256 (hex) is stored: tokens are high-entropy, so a slow password
hash would buy nothing, and SHA-256 can be computed by the stock SQL clients of
both databases (``SHA2(x, 256)`` in MySQL, ``sha256()`` in PostgreSQL).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
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


def parse_models(value: str | None) -> frozenset[str] | None:
    """``allowed_models`` as stored (comma-separated); None means every model."""
    names = frozenset(part.strip() for part in (value or "").split(",") if part.strip())
    return names or None


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

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.monotonic() if now is None else now) >= self.expires

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class TokenUnavailable(Exception):
    """The token database could not be asked, and nothing usable is cached for this token."""


class TokenStore:
    """Looks tokens up by hash, with a TTL cache in front of the database.

    Concurrent lookups of the same token share one query. Unknown tokens are
    cached too (shorter), so a client hammering with a bad key does not reach
    the database on every request; the cache is bounded (LRU). When the
    database cannot be reached, a token seen within ``stale_ttl`` keeps
    working from its cached entry (retried at most every ``retry`` seconds),
    so a short outage does not stop traffic; an unknown one raises
    :class:`TokenUnavailable`.
    """

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
        self._inflight: dict[str, asyncio.Future[Token | None]] = {}

    @property
    def warm(self) -> bool:
        """Whether some token is cached, so that traffic can go on while the database is away."""
        return any(entry[2] is not None for entry in reversed(self._cache.values()))

    async def lookup(self, secret: str) -> Token | None:
        key = hash_secret(secret)
        entry = self._cache.get(key)
        if entry is not None and entry[0] > time.monotonic():
            return entry[2]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Token | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            token = await self._refresh(key, entry)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        else:
            future.set_result(token)
            return token
        finally:
            del self._inflight[key]

    async def _refresh(self, key: str, entry: tuple[float, float, Token | None] | None) -> Token | None:
        try:
            async with asyncio.timeout(self._timeout):
                token = await self._query(key)
        except Exception as exc:
            now = time.monotonic()
            if entry is None or entry[2] is None or entry[1] <= now:
                raise TokenUnavailable(type(exc).__name__) from exc
            log.warning("token database unreachable (%s); serving a cached token", type(exc).__name__)
            self._cache[key] = (now + self._retry, entry[1], entry[2])
            return entry[2]
        now = time.monotonic()
        ttl = self._ttl if token is not None else self._negative_ttl
        self._cache[key] = (now + ttl, now + self._stale_ttl, token)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return token

    async def _query(self, key: str) -> Token | None:
        t = tokens_table.c
        statement = sa.select(
            t.id,
            t.name,
            t.priority,
            t.threshold,
            t.enabled,
            t.expires_at,
            t.allowed_models,
            t.rpm_limit,
            t.tpm_limit,
            sa.func.localtimestamp().label("db_now"),
        ).where(t.token_hash == key)
        self._on_query()
        async with self._engine.connect() as conn:
            row = (await conn.execute(statement)).first()
        if row is None:
            return None
        expires = None
        if row.expires_at is not None:
            # Both times come from the database's clock and zone, so their difference is exact.
            expires = time.monotonic() + (row.expires_at - row.db_now).total_seconds()
        return Token(
            id=row.id,
            name=row.name,
            priority=row.priority,
            threshold=row.threshold,
            enabled=bool(row.enabled),
            expires=expires,
            models=parse_models(row.allowed_models),
            rpm=row.rpm_limit,
            tpm=row.tpm_limit,
        )
