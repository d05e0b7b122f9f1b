"""What the OpenAPI description (``GET /openapi.json``) says about the forwarded calls.

Their handlers read the raw body (it is relayed byte for byte), so FastAPI
cannot infer its shape; it is declared here instead: a JSON object naming a
``model``, plus the headers the sender itself reads. The description is what
the test suite fuzzes.
"""

from __future__ import annotations

from typing import Any

BEARER = {"bearer": {"type": "http", "scheme": "bearer"}}


def forwarded(max_priority: int) -> dict[str, Any]:
    """The description of a forwarded call on a priority scale of 0 to ``max_priority``."""
    return {
        "security": [{"bearer": []}],
        "parameters": _headers(max_priority),
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["model"],
                        "properties": {
                            "model": {"type": "string", "minLength": 1},
                            "stream": {"type": "boolean"},
                        },
                        "additionalProperties": True,
                    }
                }
            },
        },
        "responses": {
            "200": {"description": "The backend's answer, relayed (server-sent events when streamed)."},
            "default": {"description": "An OpenAI-shaped error: {error: {message, type, param, code}}."},
        },
    }


def _headers(max_priority: int) -> list[dict[str, Any]]:
    return [
        {
            "name": "X-Priority",
            "in": "header",
            "required": False,
            "description": f"Lower this request's priority below its token's (0-{max_priority}).",
            "schema": {"type": "integer", "minimum": 0, "maximum": max_priority},
        },
        {
            "name": "X-Request-Timeout",
            "in": "header",
            "required": False,
            "description": "Seconds the client waits at most; shortens the server's deadline.",
            "schema": {"type": "number", "exclusiveMinimum": 0},
        },
        {
            "name": "X-Request-Id",
            "in": "header",
            "required": False,
            "description": "Echoed in the response and in both services' logs.",
            "schema": {"type": "string", "maxLength": 64},
        },
    ]


AUTHENTICATED: dict[str, Any] = {"security": [{"bearer": []}]}


def add_security_scheme(schema: dict[str, Any]) -> dict[str, Any]:
    schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(BEARER)
    return schema
