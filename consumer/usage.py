"""Token counts read from the backend's answers, for the consumer's metrics.

Only the ``usage`` object the backend itself reports is trusted: the whole
body of a plain answer, or the usage chunk that ends a stream when the client
asked for it (``stream_options.include_usage``).
"""

from __future__ import annotations

import orjson

TAIL_BYTES = 4096
"""How much of the end of a stream is kept to find its usage chunk."""


def from_body(body: bytes) -> tuple[int, int] | None:
    """(prompt tokens, completion tokens) of a JSON answer, if it reports them."""
    try:
        usage = orjson.loads(body).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return _counts(usage)


def from_stream_tail(tail: bytes) -> tuple[int, int] | None:
    """The usage reported by the last event that has one, in the end of an event stream."""
    for event in reversed(tail.split(b"\n\n")):
        if b'"usage"' not in event or not event.startswith(b"data: {"):
            continue
        try:
            counts = _counts(orjson.loads(event[6:]).get("usage"))
        except orjson.JSONDecodeError:
            continue
        if counts is not None:
            return counts
    return None


def _counts(usage: object) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int):
        return None
    return prompt, completion if isinstance(completion, int) else 0
