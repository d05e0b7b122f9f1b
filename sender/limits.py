"""Per-token rate limits (requests and tokens per minute), shared by every sender replica.

The counters live in the token database (``rate_windows``: one row per token
and minute), which every replica already uses, so no other service is needed.
To keep the database off the hot path, both limits are handed out in
*leases*: a replica atomically adds a batch to the minute's counter, is
granted what is left under the limit, and spends that locally before asking
again. A lease never exceeds the limit, so the limits hold exactly across
replicas.

- **Requests per minute**: a lease is about 2% of the limit (at least 1). What
  a replica leased and did not use in a minute is lost, at most one lease per
  replica. A token limited to 60 per minute costs one query per request; one
  limited to 6,000, one per 120.
- **Tokens per minute** are known only once an answer ends, so admission
  *reserves* an estimate (:func:`estimate`: the prompt's size from the body,
  plus ``max_tokens``, or this token's running average of completion tokens
  when the request sets none; at most the model's ``max_model_len`` and at
  most the limit itself, so a single request always fits an empty minute).
  A request whose reservation does not fit what is left of the minute is
  refused: a token cannot start more requests in a minute than its limit
  allows at their estimated size. When the answer ends (complete, cancelled,
  cut by its deadline or interrupted: ``sender/accounting.py``), the
  reservation is *settled*: replaced by the tokens really used, in the minute
  it was made (what it over-reserved goes back to the database within
  ``sync_seconds``, for every replica; what it under-reserved is added). A
  lease is the request's reservation, or about 2% of the limit when that is
  more; what a replica leased and did not reserve is given back when the
  minute is over. Once everything settled, the minute's ``tokens`` counter is
  the exact number of tokens its requests used (give or take a lease while
  the minute lasts).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
BYTES_PER_TOKEN = 4
"""A prompt's tokens, estimated from the size of the request body (JSON included: on the high side)."""
FIRST_GUESS = 512
"""Completion tokens reserved for a request without ``max_tokens`` before the token has a history."""
AVERAGE_WEIGHT = 0.2
"""Weight of the newest answer in a token's running average of completion tokens."""


@dataclass(frozen=True, slots=True)
class Ask:
    """What admission knows of a request's size before it runs, for the tokens-per-minute estimate."""

    model: str
    body_bytes: int
    max_tokens: int | None
    """The request's ``max_tokens`` (or ``max_completion_tokens``), if it sets one."""

    @classmethod
    def of(cls, model: str, payload: dict[str, Any], body_bytes: int) -> Ask:
        wanted = payload.get("max_tokens")
        if wanted is None:
            wanted = payload.get("max_completion_tokens")
        valid = isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 0
        return cls(model=model, body_bytes=body_bytes, max_tokens=wanted if valid else None)


def estimate(ask: Ask, *, average: float | None, max_model_len: int | None) -> int:
    """Tokens a request is expected to use: its prompt, estimated from the body's size, plus what it
    may generate (``max_tokens``, else the token's running average); within the model's context."""
    completion = ask.max_tokens
    if completion is None:
        completion = FIRST_GUESS if average is None else math.ceil(average)
    tokens = ask.body_bytes // BYTES_PER_TOKEN + completion
    if max_model_len is not None and max_model_len > 0:
        tokens = min(tokens, max_model_len)
    return max(1, tokens)


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens reserved for one admitted request in one minute, until it is settled."""

    window: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Decision:
    retry_after: int | None
    """None if the request may go, else the seconds until the limit lets it (``Retry-After``)."""
    reservation: Reservation | None = None
    """Tokens reserved under the token's tokens-per-minute limit (None: it has none)."""


@dataclass
class _TokenState:
    window: int = -1
    leased: int = 0
    exhausted: bool = False
    """No request is left in this window: refuse without asking the database again."""
    budget: int = 0
    """Tokens leased for this window and not reserved yet."""
    budget_checked_at: float = float("-inf")
    """When the database last had no tokens left to lease (monotonic): asked again after a sync."""
    average: float | None = None
    """Running average of this token's completion tokens per answer (this replica's)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RateLimiter:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        sync_seconds: float = 1.0,
        timeout: float = 2.0,
        max_model_len: Callable[[str], int | None] = lambda _: None,
    ) -> None:
        """``max_model_len`` gives a model's context length (from its card), which bounds estimates."""
        self._engine = engine
        self._sync = sync_seconds
        self._timeout = timeout
        self._max_model_len = max_model_len
        self._states: dict[int, _TokenState] = {}
        self._unsynced: dict[tuple[int, int], int] = {}
        """(token id, window) -> tokens to add to the database's counter (negative: to give back)."""
        self._holding: set[int] = set()
        """Tokens whose state holds a leased budget: given back when its minute is over."""
        self._task: asyncio.Task[None] | None = None
        self._warned_at = float("-inf")

    def start(self) -> None:
        self._task = asyncio.create_task(self._sync_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._give_back(every=True)
        await self._push_tokens()

    async def admit(self, token: Token, ask: Ask | None = None) -> Decision:
        """Whether the request may go, and the tokens reserved for it (settle them with :meth:`settle`)."""
        if token.rpm is None and token.tpm is None:
            return Decision(None)
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        retry_after = max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))
        state = self._states.get(token.id)
        if state is None:
            state = self._states[token.id] = _TokenState()
        reservation = None
        async with state.lock:
            if state.window != window:
                self._end_window(token.id, state)
                state.window, state.leased, state.exhausted = window, 0, False
                state.budget_checked_at = float("-inf")
            try:
                if token.tpm is not None:
                    wanted = min(token.tpm, self.estimate(token, ask))
                    if not await self._reserve(token, state, window, wanted):
                        return Decision(retry_after)
                    reservation = Reservation(window, wanted)
                if token.rpm is not None and not await self._request_allowed(token, state, window):
                    if reservation is not None:
                        self._refund(token, state, reservation.tokens)
                    return Decision(retry_after)
            except Exception as exc:
                self._warn(exc)
        return Decision(None, reservation)

    def estimate(self, token: Token, ask: Ask | None) -> int:
        """The tokens reserved for a request of ``token`` (see :func:`estimate`)."""
        if ask is None:
            return 1
        state = self._states.get(token.id)
        return estimate(
            ask, average=state.average if state else None, max_model_len=self._max_model_len(ask.model)
        )

    def settle(self, token: Token, reservation: Reservation | None, prompt: int, completion: int) -> None:
        """Replace a request's reservation by the tokens it used (0 and 0: it was never queued)."""
        state = self._states.get(token.id)
        used = max(0, prompt) + max(0, completion)
        if state is not None and used > 0:
            state.average = (
                completion
                if state.average is None
                else (1 - AVERAGE_WEIGHT) * state.average + AVERAGE_WEIGHT * completion
            )
        if token.tpm is None:
            return
        if reservation is None:  # admitted while the limits were not enforced: count what it used
            if used:
                window = int(time.time() // WINDOW_SECONDS)
                self._add(token.id, window, used)
            return
        delta = used - reservation.tokens
        if state is not None and state.window == reservation.window:
            if delta < 0:
                self._refund(token, state, -delta)
            else:
                taken = min(state.budget, delta)
                state.budget -= taken
                self._add(token.id, reservation.window, delta - taken)
        else:
            self._add(token.id, reservation.window, delta)

    def _refund(self, token: Token, state: _TokenState, tokens: int) -> None:
        """Tokens reserved and not used: back to the database, where every replica can lease them."""
        self._add(token.id, state.window, -tokens)
        state.budget_checked_at = float("-inf")

    @staticmethod
    def _lease_size(limit: int) -> int:
        return max(1, int(limit * LEASE_FRACTION))

    def _add(self, token_id: int, window: int, tokens: int) -> None:
        if tokens:
            key = (token_id, window)
            self._unsynced[key] = self._unsynced.get(key, 0) + tokens

    def _end_window(self, token_id: int, state: _TokenState) -> None:
        """The state's minute is over: what it leased and did not reserve goes back to that minute."""
        if state.budget:
            self._add(token_id, state.window, -state.budget)
            state.budget = 0
        self._holding.discard(token_id)

    def _give_back(self, *, every: bool = False) -> None:
        """Give back the leases of minutes that are over (all of them at shutdown)."""
        window = int(time.time() // WINDOW_SECONDS)
        for token_id in list(self._holding):
            state = self._states.get(token_id)
            if state is None:
                self._holding.discard(token_id)
            elif every or state.window != window:
                self._end_window(token_id, state)

    async def _reserve(self, token: Token, state: _TokenState, window: int, wanted: int) -> bool:
        """Take ``wanted`` tokens from this replica's lease, leasing more from the database if short."""
        assert token.tpm is not None
        if state.budget < wanted:
            if time.monotonic() - state.budget_checked_at < self._sync:
                return False  # the minute was full a moment ago: do not ask the database per request
            need = wanted - state.budget
            async with asyncio.timeout(self._timeout):
                granted = await self._lease_tokens(
                    token.id, window, need, max(need, self._lease_size(token.tpm)), token.tpm
                )
            if granted < need:
                state.budget_checked_at = time.monotonic()
                return False
            state.budget += granted
            self._holding.add(token.id)
        state.budget -= wanted
        return True

    async def _lease_tokens(self, token_id: int, window: int, need: int, wanted: int, limit: int) -> int:
        """Add up to ``wanted`` (at least ``need``) to the window's token counter, under ``limit``;
        0 if not even ``need`` fits."""
        table = rate_windows_table
        where = (table.c.token_id == token_id, table.c.window_start == window)
        values = {"token_id": token_id, "window_start": window, "requests": 0, "tokens": 0}
        async with self._engine.begin() as conn:
            if self._engine.dialect.name == "postgresql":
                await conn.execute(postgresql.insert(table).values(**values).on_conflict_do_nothing())
            else:
                await conn.execute(mysql.insert(table).values(**values).prefix_with("IGNORE"))
            used = (
                await conn.execute(sa.select(table.c.tokens).where(*where).with_for_update())
            ).scalar_one()
            granted = min(wanted, limit - int(used))
            if granted < need:
                return 0
            await conn.execute(sa.update(table).where(*where).values(tokens=table.c.tokens + granted))
        return granted

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

    async def _sync_loop(self) -> None:
        last_cleanup = time.monotonic()
        while True:
            await asyncio.sleep(self._sync)
            try:
                self._give_back()
                await self._push_tokens()
                if time.monotonic() - last_cleanup > 300:
                    last_cleanup = time.monotonic()
                    await self._cleanup()
            except Exception as exc:
                self._warn(exc)

    async def _push_tokens(self) -> None:
        """Add what was settled and given back here to the database's per-minute rows."""
        if not self._unsynced:
            return
        pending, self._unsynced = self._unsynced, {}
        table = rate_windows_table
        try:
            async with asyncio.timeout(self._timeout), self._engine.begin() as conn:
                for (token_id, window), tokens in pending.items():
                    if not tokens:
                        continue
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

    async def _cleanup(self) -> None:
        oldest = int(time.time() // WINDOW_SECONDS) - KEEP_WINDOWS
        async with asyncio.timeout(self._timeout), self._engine.begin() as conn:
            await conn.execute(
                sa.delete(rate_windows_table).where(rate_windows_table.c.window_start < oldest)
            )
        if len(self._states) > 100_000:
            self._give_back(every=True)
            self._states.clear()

    def _warn(self, exc: BaseException) -> None:
        if time.monotonic() - self._warned_at > 10:
            self._warned_at = time.monotonic()
            log.warning("rate limits not enforced: token database unreachable (%s)", type(exc).__name__)
