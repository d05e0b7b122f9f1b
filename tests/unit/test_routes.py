"""The relayed routes: which paths a sender relays, which a consumer calls, how extra routes are checked."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from consumer.backend import Backend
from consumer.settings import ConsumerSettings
from contract import errors
from contract.errors import clip
from contract.routes import FORBIDDEN_ROUTES, RELAYED_ROUTES, RouteError, check_route, parse_extra_routes
from sender.errors import ApiError
from sender.front import relayed_route
from sender.settings import SenderSettings


def scope(raw_path: bytes, query: bytes = b"") -> dict[str, Any]:
    return {"raw_path": raw_path, "path": raw_path.decode("latin-1"), "query_string": query}


@pytest.mark.parametrize("route", sorted(RELAYED_ROUTES))
def test_every_relayed_route_is_relayed_as_it_is(route: str) -> None:
    assert relayed_route(scope(route.encode()), RELAYED_ROUTES) == route
    assert check_route(route) == route


@pytest.mark.parametrize(
    ("raw", "query", "problem"),
    [
        (b"/v1/../reset_prefix_cache", b"", "dot segment"),
        (b"/v1/%2e%2e/sleep", b"level=1", "percent-encoding"),
        (b"/v1/..%2fcollective_rpc", b"", "percent-encoding"),
        (b"/v1/models/../../start_profile", b"", "dot segment"),
        (b"/v1/%252e%252e/health", b"", "percent-encoding"),
        (b"/v1/..\\sleep", b"", "backslash"),
        (b"/v1/./chat/completions", b"", "dot segment"),
        (b"/v1//chat/completions", b"", "empty segment"),
        (b"/v1/chat/completions/", b"", "empty segment"),
        (b"/v1/chat/completions", b"x=1", "query string"),
        (b"/v1/chat/completions\xc3\xa9", b"", "must be encoded"),
    ],
)
def test_paths_that_read_two_ways_are_invalid(raw: bytes, query: bytes, problem: str) -> None:
    with pytest.raises(ApiError) as refused:
        relayed_route(scope(raw, query), RELAYED_ROUTES)
    assert refused.value.kind is errors.INVALID_PATH
    assert problem in refused.value.message


@pytest.mark.parametrize(
    "raw", [b"/", b"/sleep", b"/v1/load_lora_adapter", b"/v1/models", b"/V1/completions"]
)
def test_plain_paths_that_are_not_routes_go_to_the_router(raw: bytes) -> None:
    assert relayed_route(scope(raw), RELAYED_ROUTES) is None


def test_extra_routes_are_checked() -> None:
    assert parse_extra_routes(" /v1/messages, /invocations ,") == {"/v1/messages", "/invocations"}
    for bad in ("v1/x", "/v1/../x", "/v1/%2e", "/v1/x?y", "/v1//x", "/v1/x/", "/v1/x.y", "/a\\b"):
        with pytest.raises(RouteError):
            check_route(bad)
    for forbidden in sorted(FORBIDDEN_ROUTES):
        with pytest.raises(RouteError, match="never relayed"):
            check_route(forbidden)
    settings = SenderSettings(extra_routes="/v1/messages")
    assert settings.relayed_routes == RELAYED_ROUTES | {"/v1/messages"}
    with pytest.raises(pydantic.ValidationError):
        SenderSettings(extra_routes="/sleep")
    with pytest.raises(pydantic.ValidationError):
        ConsumerSettings(model="m", extra_routes="/v1/../sleep")
    assert ConsumerSettings(model="m", extra_routes="/v1/messages").relayed_routes == settings.relayed_routes


def test_the_consumer_builds_backend_urls_verbatim() -> None:
    backend = Backend("http://127.0.0.1:8000/", max_connections=1)
    for path in ("/v1/chat/completions", "/v1/../sleep", "/v1/%2e%2e/sleep", "/v1/%252e%252e/x"):
        url = backend.url(path)
        assert url.raw_path == path and str(url) == "http://127.0.0.1:8000" + path


def test_client_strings_are_clipped() -> None:
    assert clip("short") == "short"
    long = clip("m" * (1024 * 1024))
    assert len(long) < 130 and long.startswith("m" * 100) and "1048576 characters" in long
