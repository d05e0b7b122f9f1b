"""Bearer tokens: the table, how secrets are hashed, and the cached lookup.

Secrets are random strings that clients present as ``Authorization: Bearer``.
Only their SHA-256 (hex) is stored: tokens are high-entropy, so a slow password
hash would buy nothing, and SHA-256 can be computed by the stock SQL clients of
both databases (``SHA2(x, 256)`` in MySQL, ``sha256()`` in PostgreSQL).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

metadata = sa.MetaData()

tokens_table = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("threshold", sa.Integer, nullable=False, server_default="100"),
    sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.current_timestamp()),
)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return "sk-" + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Token:
    """What the sender needs to know about a caller. Never holds the secret."""

    name: str
    priority: int
    threshold: int
    """Queue depth of the model at or beyond which this token's requests get 429."""


class TokenStore:
    """Looks tokens up by hash, with a small TTL cache in front of the database.

    Concurrent lookups of the same token share one query. Unknown tokens are
    cached too (shorter), so a client hammering with a bad key does not reach
    the database on every request; the cache is bounded (LRU).
    """

    def __init__(self, engine: AsyncEngine, *, ttl: float, negative_ttl: float, max_entries: int) -> None:
        self._engine = engine
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, Token | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Token | None]] = {}

    async def lookup(self, secret: str) -> Token | None:
        key = hash_secret(secret)
        entry = self._cache.get(key)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            return entry[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Token | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            token = await self._query(key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        else:
            future.set_result(token)
            self._remember(key, token)
            return token
        finally:
            del self._inflight[key]

    def _remember(self, key: str, token: Token | None) -> None:
        ttl = self._ttl if token is not None else self._negative_ttl
        self._cache[key] = (time.monotonic() + ttl, token)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def _query(self, key: str) -> Token | None:
        statement = sa.select(tokens_table.c.name, tokens_table.c.priority, tokens_table.c.threshold).where(
            tokens_table.c.token_hash == key
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(statement)).first()
        if row is None:
            return None
        return Token(name=row.name, priority=row.priority, threshold=row.threshold)


async def create_schema(engine: AsyncEngine) -> None:
    """Create the token table if it is missing (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


async def add_token(
    engine: AsyncEngine, name: str, *, secret: str | None = None, priority: int = 0, threshold: int = 100
) -> str:
    """Store a token and return its secret (generated unless given). Replaces a token of the same name."""
    secret = secret or new_secret()
    async with engine.begin() as conn:
        await conn.execute(sa.delete(tokens_table).where(tokens_table.c.name == name))
        await conn.execute(
            sa.insert(tokens_table).values(
                name=name, token_hash=hash_secret(secret), priority=priority, threshold=threshold
            )
        )
    return secret
