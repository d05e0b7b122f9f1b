"""Per-token rate limits (requests and tokens per minute), shared by every sender replica.

The counters live in the token database (``rate_windows``: one row per token
and minute), which every replica already uses, so no other service is needed.
To keep the database off the hot path:

- **Requests per minute** are handed out in leases: a replica atomically adds
  a small batch (about 2% of the limit, at least 1) to the minute's counter,
  is granted what is left under the limit, and admits that many requests
  locally before asking again. The limit therefore holds exactly across
  replicas (a lease never exceeds it); what a replica leased and did not use
  in a minute is lost, at most one lease per replica. A token limited to 60
  per minute costs one query per request; one limited to 6,000, one per 120.
- **Tokens per minute** are known only once an answer is complete: they are
  counted then (added to the minute's row every ``sync_seconds``) and checked
  on admission against the minute's total as last read (at most
  ``sync_seconds`` old) plus what this replica counted since. A request
  admitted under the limit may take the total over it; the next ones wait.

Windows are calendar minutes; a refused request gets ``Retry-After`` = the
seconds left in the minute. If the database cannot be reached the limits are
not enforced (traffic goes on; a warning is logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from sender.tables import rate_windows_table
from sender.tokens import Token

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
LEASE_FRACTION = 0.02
KEEP_WINDOWS = 60
"""Minutes of counters kept in the database before the senders delete them."""


@dataclass
class _TokenState:
    window: int = -1
    leased: int = 0
    exhausted: bool = False
    """No request is left in this window: refuse without asking the database again."""
    tokens_read: int = 0
    """The window's token total as last read from the database."""
    tokens_local: int = 0
    """Tokens this replica counted in this window since that read."""
    read_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RateLimiter:
    def __init__(self, engine: AsyncEngine, *, sync_seconds: float = 1.0, timeout: float = 2.0) -> None:
        self._engine = engine
        self._sync = sync_seconds
        self._timeout = timeout
        self._states: dict[int, _TokenState] = {}
        self._unsynced: dict[tuple[int, int], int] = {}
        """(token id, window) -> tokens counted here and not yet added to the database."""
        self._task: asyncio.Task[None] | None = None
        self._warned_at = float("-inf")

    def start(self) -> None:
        self._task = asyncio.create_task(self._sync_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._push_tokens()

    async def admit(self, token: Token) -> int | None:
        """None if the request may go, else the seconds until the limit lets it (``Retry-After``)."""
        if token.rpm is None and token.tpm is None:
            return None
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        retry_after = max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))
        state = self._states.get(token.id)
        if state is None:
            state = self._states[token.id] = _TokenState()
        async with state.lock:
            if state.window != window:
                state.window, state.leased, state.exhausted = window, 0, False
                state.tokens_read, state.tokens_local, state.read_at = 0, 0, float("-inf")
            try:
                if token.tpm is not None and not await self._tokens_allow(token, state, window):
                    return retry_after
                if token.rpm is not None and not await self._request_allowed(token, state, window):
                    return retry_after
            except Exception as exc:
                self._warn(exc)
        return None

    def spent(self, token: Token, tokens: int) -> None:
        """Count the tokens of an answer against the token's per-minute limit."""
        if token.tpm is None or tokens <= 0:
            return
        window = int(time.time() // WINDOW_SECONDS)
        key = (token.id, window)
        self._unsynced[key] = self._unsynced.get(key, 0) + tokens
        state = self._states.get(token.id)
        if state is not None and state.window == window:
            state.tokens_local += tokens

    async def _tokens_allow(self, token: Token, state: _TokenState, window: int) -> bool:
        assert token.tpm is not None
        if time.monotonic() - state.read_at >= self._sync:
            async with asyncio.timeout(self._timeout):
                total = await self._read_tokens(token.id, window)
            # What this replica counted and has not pushed yet is not in the total.
            state.tokens_read, state.tokens_local = total, self._unsynced.get((token.id, window), 0)
            state.read_at = time.monotonic()
        return state.tokens_read + state.tokens_local < token.tpm

    async def _request_allowed(self, token: Token, state: _TokenState, window: int) -> bool:
        assert token.rpm is not None
        if state.leased > 0:
            state.leased -= 1
            return True
        if state.exhausted:
            return False
        wanted = max(1, int(token.rpm * LEASE_FRACTION))
        async with asyncio.timeout(self._timeout):
            granted = await self._lease(token.id, window, wanted, token.rpm)
        if granted == 0:
            state.exhausted = True
            return False
        state.leased = granted - 1
        return True

    async def _lease(self, token_id: int, window: int, wanted: int, limit: int) -> int:
        """Add ``wanted`` to the window's request counter; grant what fit under ``limit``."""
        table = rate_windows_table
        values = {"token_id": token_id, "window_start": window, "requests": wanted, "tokens": 0}
        async with self._engine.begin() as conn:
            if self._engine.dialect.name == "postgresql":
                pg = postgresql.insert(table).values(**values)
                statement = pg.on_conflict_do_update(
                    index_elements=[table.c.token_id, table.c.window_start],
                    set_={"requests": table.c.requests + pg.excluded.requests},
                ).returning(table.c.requests)
                after = (await conn.execute(statement)).scalar_one()
            else:
                my = mysql.insert(table).values(**values)
                await conn.execute(my.on_duplicate_key_update(requests=table.c.requests + wanted))
                # The upsert holds the row's lock until commit, so this reads our own sum.
                after = (
                    await conn.execute(
                        sa.select(table.c.requests).where(
                            table.c.token_id == token_id, table.c.window_start == window
                        )
                    )
                ).scalar_one()
        return max(0, min(wanted, limit - (int(after) - wanted)))

    async def _read_tokens(self, token_id: int, window: int) -> int:
        table = rate_windows_table
        statement = sa.select(table.c.tokens).where(
            table.c.token_id == token_id, table.c.window_start == window
        )
        async with self._engine.connect() as conn:
            value = (await conn.execute(statement)).scalar()
        return int(value or 0)

    async def _sync_loop(self) -> None:
        last_cleanup = time.monotonic()
        while True:
            await asyncio.sleep(self._sync)
            try:
                await self._push_tokens()
                if time.monotonic() - last_cleanup > 300:
                    last_cleanup = time.monotonic()
                    await self._cleanup()
            except Exception as exc:
                self._warn(exc)

    async def _push_tokens(self) -> None:
        """Add the tokens counted here to the database's per-minute rows."""
        if not self._unsynced:
            return
        pending, self._unsynced = self._unsynced, {}
        table = rate_windows_table
        try:
            async with asyncio.timeout(self._timeout), self._engine.begin() as conn:
                for (token_id, window), tokens in pending.items():
                    values = {"token_id": token_id, "window_start": window, "requests": 0, "tokens": tokens}
                    if self._engine.dialect.name == "postgresql":
                        pg = postgresql.insert(table).values(**values)
                        await conn.execute(
                            pg.on_conflict_do_update(
                                index_elements=[table.c.token_id, table.c.window_start],
                                set_={"tokens": table.c.tokens + pg.excluded.tokens},
                            )
                        )
                    else:
                        my = mysql.insert(table).values(**values)
                        await conn.execute(my.on_duplicate_key_update(tokens=table.c.tokens + tokens))
        except BaseException:
            for key, tokens in pending.items():  # try again next time
                self._unsynced[key] = self._unsynced.get(key, 0) + tokens
            raise
        for (token_id, window), tokens in pending.items():
            state = self._states.get(token_id)
            if state is not None and state.window == window:
                # Now in the database: counted in the next read rather than locally.
                state.tokens_local = max(0, state.tokens_local - tokens)
                state.tokens_read += tokens

    async def _cleanup(self) -> None:
        oldest = int(time.time() // WINDOW_SECONDS) - KEEP_WINDOWS
        async with asyncio.timeout(self._timeout), self._engine.begin() as conn:
            await conn.execute(
                sa.delete(rate_windows_table).where(rate_windows_table.c.window_start < oldest)
            )
        if len(self._states) > 100_000:
            self._states.clear()

    def _warn(self, exc: BaseException) -> None:
        if time.monotonic() - self._warned_at > 10:
            self._warned_at = time.monotonic()
            log.warning("rate limits not enforced: token database unreachable (%s)", type(exc).__name__)
