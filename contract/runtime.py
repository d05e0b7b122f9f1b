"""Process tuning shared by the sender and the consumer."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Make garbage collection rarer and cheaper for a long-running async service.

    Requests allocate many short-lived objects; with CPython's default gen-0
    threshold (700) collections run hundreds of times a second and show up in
    tail latency. Objects alive after start-up are frozen out of collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
