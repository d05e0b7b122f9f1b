"""The scheduler: a fixed number of sequence slots, a waiting queue, and per-token timing.

It models what a proxy in front of vLLM can observe: at most ``max_num_seqs``
sequences run at once and the rest wait (first come, first served, or by
``priority``); a running sequence gives its first token ``ttft`` after it was
scheduled and one more every ``itl``. Timing is computed from absolute targets,
so a busy event loop delays tokens without making the schedule drift. A
sequence that is cancelled (its client went away) frees its slot at once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType


@dataclass(slots=True)
class EngineStats:
    """Monotonic counters, read by ``/metrics``."""

    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    generation_tokens_aborted: int = 0


class Engine:
    """Grants sequence slots and keeps the counters."""

    def __init__(self, *, max_num_seqs: int, ttft: float, itl: float, priority_policy: bool = False) -> None:
        self.max_num_seqs = max_num_seqs
        self.ttft = ttft
        self.itl = itl
        self.priority_policy = priority_policy
        self.running = 0
        self.waiting = 0
        self.peak_requests = 0
        """Most sequences ever running and waiting at once: what a dispatcher sent concurrently."""
        self.stats = EngineStats()
        self._active: set[Sequence] = set()
        # (priority, arrival, future) entries; a cancelled future marks an entry that left the queue.
        self._queue: list[tuple[int, int, asyncio.Future[float]]] = []
        self._arrivals = itertools.count()

    def generation_tokens(self) -> int:
        """Tokens generated so far, counting the running sequences' tokens due by now."""
        now = asyncio.get_running_loop().time()
        return self.stats.generation_tokens + sum(sequence.produced_by(now) for sequence in self._active)

    def sequence(self, prompt_tokens: int, max_tokens: int, priority: int = 0) -> Sequence:
        """A sequence to run with ``async with``: entering waits for a slot, leaving frees it."""
        return Sequence(self, prompt_tokens, max_tokens, priority)

    async def _admit(self, priority: int) -> float:
        """Wait for a slot; return the loop time the sequence was scheduled at."""
        loop = asyncio.get_running_loop()
        self.peak_requests = max(self.peak_requests, self.running + self.waiting + 1)
        if self.running < self.max_num_seqs and not self.waiting:
            self.running += 1
            return loop.time()
        granted: asyncio.Future[float] = loop.create_future()
        key = priority if self.priority_policy else 0
        heapq.heappush(self._queue, (key, next(self._arrivals), granted))
        self.waiting += 1
        try:
            return await granted
        except asyncio.CancelledError:
            if granted.cancelled():
                self.waiting -= 1
                if not self.waiting:
                    self._queue.clear()
            else:
                self._release()
            raise

    def _release(self) -> None:
        """Hand the slot to the next waiting sequence, or give it back."""
        while self._queue:
            granted = heapq.heappop(self._queue)[2]
            if not granted.cancelled():
                self.waiting -= 1
                granted.set_result(asyncio.get_running_loop().time())
                return
        self.running -= 1


class Sequence:
    """One request's generation: its slot, its token schedule and what it produced."""

    __slots__ = ("_engine", "_timed", "max_tokens", "priority", "produced", "prompt_tokens", "start")

    def __init__(self, engine: Engine, prompt_tokens: int, max_tokens: int, priority: int) -> None:
        self._engine = engine
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.priority = priority
        self.start: float | None = None
        self.produced = 0
        self._timed = False

    def token_time(self, index: int) -> float:
        """Loop time at which token ``index`` (from 0) is generated."""
        assert self.start is not None, "the sequence is not running"
        return self.start + self._engine.ttft + index * self._engine.itl

    async def __aenter__(self) -> Sequence:
        try:
            self.start = await self._engine._admit(self.priority)
        except asyncio.CancelledError:
            self._engine.stats.requests_aborted += 1
            raise
        self._engine.stats.prompt_tokens += self.prompt_tokens
        self._engine._active.add(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stats = self._engine.stats
        self.produced = self.produced_by(asyncio.get_running_loop().time())
        stats.generation_tokens += self.produced
        if self.produced == self.max_tokens:
            stats.requests_finished += 1
        else:
            stats.requests_aborted += 1
            stats.generation_tokens_aborted += self.produced
        self._engine._active.discard(self)
        self._engine._release()

    def produced_by(self, now: float) -> int:
        """Tokens generated by ``now``: those streamed, or those due if the sequence runs in one sleep."""
        if self._timed and self.produced < self.max_tokens:
            return self._due(now)
        return self.produced

    async def run(self) -> None:
        """Generate every token with a single sleep: a non-streamed answer needs no per-token wake-ups."""
        self._timed = True
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.token_time(self.max_tokens - 1) - loop.time())
        self.produced = self.max_tokens

    async def stream(self) -> AsyncGenerator[int, None]:
        """Yield each token index at its time."""
        loop = asyncio.get_running_loop()
        for index in range(self.max_tokens):
            delay = self.token_time(index) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif index % 64 == 63:
                # Behind schedule (or no inter-token latency): still let the server breathe, as
                # vLLM's API server does, so /metrics answers and a client's disconnect is seen.
                await asyncio.sleep(0)
            self.produced = index + 1
            yield index

    def _due(self, now: float) -> int:
        """Tokens generated by ``now`` on this sequence's schedule."""
        since_first = now - self.token_time(0)
        if since_first < 0:
            return 0
        if self._engine.itl <= 0:
            return self.max_tokens
        return min(self.max_tokens, 1 + int(since_first / self._engine.itl))
