"""The OpenAPI description as written (no service needed); tests/api/test_openapi.py tries the server."""

from __future__ import annotations

from typing import Any

import orjson

from contract import errors
from contract.routes import RELAYED_ROUTES
from sender import openapi
from sender.app import create_app
from sender.settings import SenderSettings


def description() -> dict[str, Any]:
    throttle: Any = create_app(SenderSettings())
    fastapi_app = throttle.app.app  # AuthThrottle(ForwardingFront(FastAPI))
    result: dict[str, Any] = fastapi_app.openapi()
    return result


def test_no_422_nor_fastapi_validation_schemas() -> None:
    text = orjson.dumps(description()).decode()
    assert '"422"' not in text and "HTTPValidationError" not in text


def test_every_error_code_is_documented_on_a_route_that_answers_it() -> None:
    paths = description()["paths"]
    documented = " ".join(
        str(response.get("description", ""))
        for operations in paths.values()
        for operation in operations.values()
        for response in operation["responses"].values()
    )
    # Not an operation's answer: another method, nobody left to read it, events inside a 200 stream,
    # FastAPI's validation (no declared route has a parameter that can fail it).
    unreachable = {
        "method_not_allowed",
        "client_disconnected",
        "stream_interrupted",
        "client_too_slow",
        "shutting_down",
        "invalid_request",
    }
    for code in set(errors.CATALOGUE) - unreachable:
        assert f"`{code}`" in documented, code


def test_forwarded_calls() -> None:
    paths = description()["paths"]
    assert set(RELAYED_ROUTES) <= set(paths)
    for route in RELAYED_ROUTES:
        operation = paths[route]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body["required"] == ["model"]
        assert {p["name"] for p in operation["parameters"]} == {
            "X-Priority",
            "X-Request-Timeout",
            "X-Request-Id",
        }
        for status, response in operation["responses"].items():
            if status not in ("200",):
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"
                }
        streamed = "text/event-stream" in operation["responses"]["200"]["content"]
        assert streamed == (route in openapi.STREAMED_ROUTES), route
    # An out-of-range X-Priority is clamped, not refused: the description must not promise a refusal.
    priority = next(p for p in paths["/v1/completions"]["post"]["parameters"] if p["name"] == "X-Priority")
    assert priority["schema"] == {"type": "integer"}


def test_authenticated_routes() -> None:
    described = description()
    assert "bearer" in described["components"]["securitySchemes"]
    for path in ("/v1/models", "/v1/models/{model}"):
        operation = described["paths"][path]["get"]
        assert operation["security"] == [{"bearer": []}]
        assert {"200", "401", "429", "503"} <= set(operation["responses"])
    assert "404" in described["paths"]["/v1/models/{model}"]["get"]["responses"]
    assert "503" in described["paths"]["/health"]["get"]["responses"]
