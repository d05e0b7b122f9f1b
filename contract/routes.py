"""The backend routes a request may name: the sender relays only these, the consumer calls only these.

vLLM's server has more routes than the OpenAI API: some of them change the
server itself (``/sleep``, ``/collective_rpc``, ``/reset_prefix_cache``,
``/start_profile``, ``/v1/load_lora_adapter``, ...). None of them may be
reached through the dispatcher, so the path of a request is one of an exact
list, compared byte for byte; it is never normalised, decoded or joined. Both
services hold the same list (plus the same extra routes, if the operator
adds any), so a consumer refuses a request that names any other path even if
it was published without the sender.

Every relayed call is a JSON body naming a ``model``: routes whose body is
multipart (``/v1/audio/transcriptions``, ``/v1/audio/translations``) or that
address state kept on one backend (``/v1/responses/{id}``, ``.../cancel``)
cannot be served this way and are not in the list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

RELAYED_ROUTES: frozenset[str] = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/rerank",
        "/v1/score",
        "/rerank",
        "/score",
        "/v2/rerank",
        "/pooling",
        "/classify",
        "/tokenize",
        "/detokenize",
    }
)
"""What vLLM's OpenAI server serves as a POST of a JSON body that names a ``model``."""

FORBIDDEN_ROUTES: frozenset[str] = frozenset(
    {
        # vLLM's routes that control the server, its own health and metrics, or the model list.
        "/health",
        "/ping",
        "/load",
        "/metrics",
        "/version",
        "/server_info",
        "/v1/models",
        "/sleep",
        "/wake_up",
        "/is_sleeping",
        "/collective_rpc",
        "/reset_prefix_cache",
        "/reset_mm_cache",
        "/start_profile",
        "/stop_profile",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/scale_elastic_ep",
        "/is_scaling_elastic_ep",
        "/pause",
        "/resume",
        "/update_weights",
    }
)
"""Never relayed, not even when named as an extra route."""

MAX_ROUTE_LENGTH = 200
_ROUTE = re.compile(r"(?:/[A-Za-z0-9_-]+)+")


class RouteError(ValueError):
    """An extra route that cannot be relayed."""


def check_route(route: str) -> str:
    """``route`` if it may be added to the relayed routes; :class:`RouteError` saying why not.

    A route is an absolute path of segments made of letters, digits, ``-`` and ``_``: no dot
    segment, no percent-encoding, no query, no empty segment, nothing a client of HTTP could
    read two ways.
    """
    if len(route) > MAX_ROUTE_LENGTH or not _ROUTE.fullmatch(route):
        raise RouteError(
            f"{route[:MAX_ROUTE_LENGTH]!r} is not a route: an absolute path of segments made of "
            "letters, digits, '-' and '_' (no dots, '%', '?', '\\' or empty segment)"
        )
    if route in FORBIDDEN_ROUTES:
        raise RouteError(f"{route!r} controls the backend and is never relayed")
    return route


def parse_extra_routes(value: str | Iterable[str]) -> frozenset[str]:
    """The extra routes of a setting: comma-separated exact paths (or a list of them), each checked."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return frozenset(check_route(item.strip()) for item in items if item.strip())


def relayed_routes(extra: Iterable[str] = ()) -> frozenset[str]:
    """The relayed routes plus ``extra`` (each checked)."""
    return RELAYED_ROUTES | parse_extra_routes(extra)
