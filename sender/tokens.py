"""Bearer tokens: how secrets are hashed, and the cached lookup.

Secrets are strings that clients present as ``Authorization: Bearer``; only a
hash is stored. With a pepper (``SENDER_TOKEN_PEPPER`` or
``SENDER_TOKEN_PEPPER_FILE``, a server-side secret kept out of the database)
the hash is HMAC-SHA-256 keyed with it (``hash_kind`` ``hmac-sha256``): a
copy of the token table alone then lets nobody test guesses, which matters
for secrets operators chose themselves. Without one it is plain SHA-256
(``sha256``), which is enough only for the CLI's 256-bit random secrets. Both
can be computed by the stock SQL clients (``db-init/*/add_token.sql`` builds
the HMAC from ``sha256()`` / ``SHA2()``), and a fast hash is right for
high-entropy secrets checked on every request.

Rows hashed before a pepper was configured keep working: a lookup asks for the
peppered hash and the plain one together, and a row found by its plain hash
is rewritten with the peppered one (``SENDER_TOKEN_LEGACY_HASHES=false`` stops
accepting plain hashes once none are left).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
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


HASH_SHA256 = "sha256"
"""``hash_kind`` of a plain SHA-256 (hex) of the secret: no pepper."""
HASH_HMAC = "hmac-sha256"
"""``hash_kind`` of HMAC-SHA-256 (hex) of the secret, keyed with the pepper."""


def hash_secret(secret: str, pepper: bytes | None = None) -> str:
    """The stored form of ``secret``: HMAC-SHA-256 keyed with ``pepper`` (hex), or without one,
    the plain SHA-256 (hex)."""
    if pepper:
        return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SecretHasher:
    """How this sender hashes secrets: with the pepper if there is one; and whether rows hashed
    before it was configured (plain SHA-256) are still accepted, and upgraded when they are."""

    pepper: bytes | None = None
    accept_legacy: bool = True

    @property
    def kind(self) -> str:
        return HASH_HMAC if self.pepper else HASH_SHA256

    def hash(self, secret: str) -> str:
        return hash_secret(secret, self.pepper)

    def legacy(self, secret: str) -> str | None:
        """The plain hash a row made before the pepper may hold; None if there is nothing to try."""
        return hash_secret(secret) if self.pepper and self.accept_legacy else None


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
    max_parallel: int | None = None
    """Requests of this token queued or running at once (per sender replica); None: no limit."""

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
    secrets are remembered too (shorter), so a client hammering with a bad key
    does not reach the database on every request, in a cache of their own
    (``negative_entries``, LRU): spraying random keys can neither evict a
    known token nor grow memory. Both caches are bounded.
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
        hasher: SecretHasher | None = None,
        negative_entries: int | None = None,
    ) -> None:
        self._engine = engine
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._stale_ttl = stale_ttl
        self._timeout = timeout
        self._retry = min(ttl, 1.0)
        self._on_query = on_query
        self._hasher = hasher or SecretHasher()
        self._negative_entries = max_entries if negative_entries is None else negative_entries
        self._cache: OrderedDict[str, tuple[float, float, Token]] = OrderedDict()
        """Known tokens: hash -> (fresh until, usable until during an outage, token)."""
        self._unknown: OrderedDict[str, float] = OrderedDict()
        """Secrets the database does not know: hash -> until when they are believed unknown."""
        self._legacy: dict[str, str] = {}
        """Hash -> plain SHA-256 of the same secret, while a row may hold the latter: for misses being
        asked for, and for known tokens whose row could not be upgraded."""
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
        return bool(self._cache)

    def known(self, secret: str) -> bool:
        """Whether ``secret`` is a known token in the cache (fresh or not); never asks the database."""
        return self._hasher.hash(secret) in self._cache

    async def lookup(self, secret: str) -> Token | None:
        """The token whose secret this is, None if there is none; :class:`TokenUnavailable` if the
        database cannot say and nothing usable is cached."""
        key = self._hasher.hash(secret)
        entry = self._cache.get(key)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            self._used[key] = now
            return entry[2]
        unknown_until = self._unknown.get(key)
        if unknown_until is not None and unknown_until > now:
            return None
        future = self._waiting.get(key)
        if future is None:
            future = self._waiting[key] = asyncio.get_running_loop().create_future()
            legacy = self._hasher.legacy(secret)
            if legacy is not None:
                self._legacy[key] = legacy
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
            if token is None:
                self._cache.pop(key, None)
                self._legacy.pop(key, None)
                self._unknown[key] = now + self._negative_ttl
                self._unknown.move_to_end(key)
            else:
                self._unknown.pop(key, None)
                self._cache[key] = (now + self._ttl, now + self._stale_ttl, token)
                self._cache.move_to_end(key)
                if key in self._waiting:
                    self._used[key] = now  # asked for by a request, not only refreshed
            self._settle(key, token)
        while len(self._cache) > self._max_entries:
            evicted, _ = self._cache.popitem(last=False)
            self._legacy.pop(evicted, None)
        while len(self._unknown) > self._negative_entries:
            self._unknown.popitem(last=False)

    def _unreachable(self, keys: list[str], exc: Exception) -> None:
        now = time.monotonic()
        served = 0
        for key in keys:
            entry = self._cache.get(key)
            if entry is None or entry[1] <= now:
                if entry is None:
                    self._legacy.pop(key, None)
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
        """The tokens of these hashes (by the hash asked for); rows found by the plain hash of a
        secret whose peppered hash was asked for are upgraded to the peppered one."""
        legacy = {self._legacy[key]: key for key in keys if key in self._legacy}
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
            t.max_parallel,
            sa.func.localtimestamp().label("db_now"),
        ).where(t.token_hash.in_([*keys, *legacy]))
        self._on_query()
        async with self._engine.connect() as conn:
            rows = (await conn.execute(statement)).all()
        found: dict[str, Token] = {}
        upgrades: list[tuple[int, str, str]] = []
        for row in sorted(rows, key=lambda row: row.token_hash in legacy):  # a peppered row first
            key = legacy.get(row.token_hash, row.token_hash)
            if key in found:
                continue
            if row.token_hash in legacy:
                upgrades.append((row.id, row.token_hash, key))
            models = parse_models(row.allowed_models)
            expires = None
            if row.expires_at is not None:
                # Both times come from the database's clock and zone, so their difference is exact.
                expires = time.monotonic() + (row.expires_at - row.db_now).total_seconds()
            found[key] = Token(
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
                max_parallel=row.max_parallel,
            )
        for key in keys:
            if key in found and not any(upgrade[2] == key for upgrade in upgrades):
                self._legacy.pop(key, None)  # its row holds the peppered hash: nothing left to upgrade
        if upgrades:
            await self._upgrade(upgrades)
        return found

    async def _upgrade(self, upgrades: list[tuple[int, str, str]]) -> None:
        """Rewrite rows found by their plain hash with the peppered one. A failure is no harm: the
        row keeps working by its plain hash (remembered for refreshes) and is upgraded next time."""
        t = tokens_table.c
        try:
            async with self._engine.begin() as conn:
                for token_id, old, new in upgrades:
                    await conn.execute(
                        sa.update(tokens_table)
                        .where(t.id == token_id, t.token_hash == old)
                        .values(token_hash=new, hash_kind=self._hasher.kind)
                    )
        except Exception as exc:
            log.warning(
                "could not upgrade %d token hashes to the pepper: %s", len(upgrades), type(exc).__name__
            )
            return
        for _, _, key in upgrades:
            self._legacy.pop(key, None)
        log.info("upgraded %d token hashes to the pepper (HMAC-SHA-256)", len(upgrades))
