"""The body a backend gets: the client's own, byte for byte, unless the consumer must add to it.

Two things are added, and only here: vLLM's ``priority`` (with
``CONSUMER_FORWARD_PRIORITY``, for ``--scheduling-policy priority``), and, on a
streamed chat or completion, a request for the usage chunk, so that tokens are
counted even when the client did not ask for them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

import contract
from contract import Request

USAGE_PATHS = ("/v1/chat/completions", "/v1/completions")
"""Streamed endpoints that can end with a usage chunk."""


class BackendBody(NamedTuple):
    body: bytes
    strip_usage: bool
    """The client did not ask for the usage chunk: it must be removed from what it receives."""


def rewrite(request: Request, *, forward_priority: bool, max_priority: int) -> BackendBody:
    """The body to send the backend for ``request``."""
    wants_usage = request.stream and request.path in USAGE_PATHS
    if not forward_priority and not wants_usage:
        return BackendBody(request.body, False)
    try:
        payload = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        return BackendBody(request.body, False)  # the backend will answer 400 itself
    if not isinstance(payload, dict):
        return BackendBody(request.body, False)
    strip = ask_for_usage(payload) if wants_usage else False
    if forward_priority:
        # vLLM serves lower values first; our wire serves higher first (fair-share sub-levels included).
        payload["priority"] = contract.wire_max_priority(max_priority) - request.priority
    return BackendBody(orjson.dumps(payload), strip)


def ask_for_usage(payload: dict[str, Any]) -> bool:
    """Make a streamed request end with the backend's usage chunk; True if the client had not asked
    for it (the chunk must then be removed from what the client receives)."""
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    # Without include_usage vLLM ignores continuous_usage_stats: keep it that way.
    payload["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
        "continuous_usage_stats": False,
    }
    return True
