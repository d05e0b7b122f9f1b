"""How many requests a consumer may hold at once, driven by its backend's load.

A priority queue orders only what is still in the broker. So the consumer
takes a new request only while vLLM can start it at once (its own waiting
queue near zero, KV cache not full); the rest wait in RabbitMQ, in priority
order. The window grows while the backend keeps up (doubling at first, then
one at a time) and, as soon as requests wait inside the backend, shrinks by
that many: what it holds minus the backend's excess. A full KV cache holds
the window where it is.
"""

from __future__ import annotations

from consumer.backend import BackendLoad


class Window:
    """The number of unanswered requests the consumer may hold."""

    def __init__(self, *, maximum: int, initial: int, waiting_tolerance: float, kv_cache_max: float) -> None:
        self.maximum = maximum
        self.size = max(1, min(initial, maximum))
        self._waiting_tolerance = waiting_tolerance
        self._kv_cache_max = kv_cache_max
        self._slow_start = True

    def update(self, load: BackendLoad, inflight: int) -> int:
        """Adjust to the latest backend load reading and return the new size."""
        kv_full = load.kv_cache is not None and load.kv_cache > self._kv_cache_max
        if load.waiting > self._waiting_tolerance:
            # Give back exactly the excess that waits inside the backend.
            self._slow_start = False
            excess = int(load.waiting - self._waiting_tolerance)
            self.size = min(self.size, inflight) - excess
        elif kv_full:
            # A full KV cache only stops growth: shrinking to what happens to be in flight would
            # leave requests in transit (being answered, or on their way) without a slot to return to.
            self._slow_start = False
        elif inflight >= self.size:
            self.size = self.size * 2 if self._slow_start else self.size + 1
        self.size = max(1, min(self.size, self.maximum))
        return self.size
