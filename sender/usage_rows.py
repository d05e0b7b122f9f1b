"""Usage rows (``usage_records``): one per finished request, written off the request path in batches.

A request only appends its row to a bounded buffer; a background task
inserts what piled up every ``flush_seconds`` in one statement, so a slow or
absent database never slows an answer. If the database is unreachable, rows
wait in the buffer (up to ``max_rows``; beyond that the oldest are dropped
and counted) and go out with the next flush that works. A clean shutdown
flushes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from sender.tables import usage_table

log = logging.getLogger(__name__)

BATCH_ROWS = 2000


class UsageRecorder:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        flush_seconds: float,
        max_rows: int,
        timeout: float = 10.0,
        on_dropped: Callable[[int], None] = lambda _: None,
        on_written: Callable[[int], None] = lambda _: None,
    ) -> None:
        self._engine = engine
        self._flush_seconds = flush_seconds
        self._timeout = timeout
        self._rows: deque[dict[str, Any]] = deque()
        self._max_rows = max_rows
        self._on_dropped = on_dropped
        self._on_written = on_written
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._warned_at = float("-inf")

    def record(self, row: dict[str, Any]) -> None:
        """Queue a row (keys: the columns of ``usage_records`` but ``id`` and ``finished_at``)."""
        self._rows.append(row)
        if len(self._rows) > self._max_rows:
            self._rows.popleft()
            self._on_dropped(1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        """Stop the timer and write every row still buffered."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            while self._rows:
                await self.flush()
        except Exception as exc:
            log.error("%d usage rows could not be written at shutdown: %s", len(self._rows), exc)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            try:
                while len(self._rows) >= BATCH_ROWS:
                    await self.flush()
                await self.flush()
            except Exception as exc:
                if time.monotonic() - self._warned_at > 10:  # once in a while, not every flush
                    self._warned_at = time.monotonic()
                    log.warning(
                        "usage rows not written yet (%d waiting): %s", len(self._rows), type(exc).__name__
                    )

    async def flush(self) -> None:
        """Insert up to one batch of buffered rows; they stay buffered if the insert fails."""
        async with self._lock:
            if not self._rows:
                return
            batch = [self._rows.popleft() for _ in range(min(BATCH_ROWS, len(self._rows)))]
            try:
                async with asyncio.timeout(self._timeout), self._engine.begin() as conn:
                    await conn.execute(sa.insert(usage_table), batch)
            except BaseException:
                self._rows.extendleft(reversed(batch))
                raise
            self._on_written(len(batch))
