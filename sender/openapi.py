"""What the OpenAPI description (``GET /openapi.json``) says: every status each route answers, and why.

FastAPI infers little here: the forwarded calls read the raw body (it is
relayed byte for byte), the other routes answer raw bytes, and its own
guesses are wrong for this server (a 422 it never sends: validation errors
are answered 400 in OpenAI's shape). So each operation's responses are
declared from the error catalogue (:mod:`contract.errors`): the statuses the
sender or a consumer can answer on that route, each listing its codes, with
OpenAI's error object as the body; the backend's own answers, relayed
untouched, are the forwarded calls' ``default``. The test suite holds the
server to it with schemathesis' default checks (``tests/api/test_openapi.py``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from contract import errors
from contract.errors import ErrorKind

BEARER = {"bearer": {"type": "http", "scheme": "bearer"}}
JSON = "application/json"
EVENT_STREAM = "text/event-stream"

_ERROR_REF = {"$ref": "#/components/schemas/Error"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "OpenAI's error object. The dispatcher's own errors carry a `code` from its "
        "catalogue; errors the model's server answered are relayed as it sent them (vLLM's `code` "
        "is the HTTP status).",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "integer", "null"]},
                },
            }
        },
    },
    "Model": {
        "type": "object",
        "description": "A model a live consumer serves, with what its backend reports about it.",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "max_model_len": {"type": ["integer", "null"]},
            "root": {"type": ["string", "null"]},
            "parent": {
                "type": ["string", "null"],
                "description": "For a LoRA adapter, the model it adapts (as vLLM reports it).",
            },
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
        },
    },
    "Event": {
        "type": "object",
        "description": "One server-sent event of a streamed answer: `data` is a JSON chunk, an error "
        "object, or `[DONE]` at the end.",
        "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "broker", "database"],
        "properties": {
            "status": {"enum": ["ok", "unavailable"]},
            "broker": {"type": "boolean", "description": "The broker connection is up."},
            "database": {"type": "boolean", "description": "The token database answers."},
        },
    },
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 0},
    }
}
_REQUEST_ID = {
    "X-Request-Id": {
        "description": "The request's id: the client's `X-Request-Id` (its first 64 characters) or a "
        "new one; it names the request in both services' logs.",
        "schema": {"type": "string"},
    }
}

ANY_REQUEST = (errors.HEADERS_TOO_LARGE, errors.DUPLICATE_AUTHORIZATION, errors.INTERNAL_ERROR)
"""Refusals any request can get, before its route is looked at (and the sender's own failure)."""

AUTHENTICATION = (
    errors.INVALID_API_KEY,
    errors.TOKEN_DISABLED,
    errors.TOKEN_EXPIRED,
    errors.AUTH_UNAVAILABLE,
    errors.TOO_MANY_AUTH_FAILURES,
)
"""What a route that takes a bearer token answers when the token cannot be used."""

_NOT_ON_FORWARDED_CALLS = {
    errors.METHOD_NOT_ALLOWED.code,  # another method: not this operation
    errors.INVALID_REQUEST_PARAMS.code,  # FastAPI's validation: forwarded calls never reach it
    errors.CLIENT_DISCONNECTED.code,  # 499: logged and counted, but nobody is left to read it
}
FORWARDED_CALL = tuple(
    kind
    for kind in errors.CATALOGUE.values()
    if kind.status != 200 and kind.code not in _NOT_ON_FORWARDED_CALLS
)
"""Everything else in the catalogue can answer a forwarded call: refused by the sender, or answered by
the consumer instead of the backend (``stream_interrupted`` and ``shutting_down`` come only as events
inside a stream that started with 200)."""

STREAMED_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
"""The routes whose body may ask for ``stream``: their answers may be server-sent events."""


def error_responses(kinds: Iterable[ErrorKind]) -> dict[str, Any]:
    """One response per status of ``kinds``, listing its codes; OpenAI's error object as body."""
    by_status: dict[int, list[str]] = defaultdict(list)
    for kind in kinds:
        if kind.code not in by_status[kind.status]:
            by_status[kind.status].append(kind.code)
    responses: dict[str, Any] = {}
    for status, codes in sorted(by_status.items()):
        response: dict[str, Any] = {
            "description": "Error codes: " + ", ".join(f"`{code}`" for code in codes) + ".",
            "content": {JSON: {"schema": _ERROR_REF}},
        }
        if status in (429, 503):
            response["headers"] = dict(_RETRY_AFTER)
        responses[str(status)] = response
    return responses


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def liveness() -> dict[str, Any]:
    ok = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
    return {"responses": {"200": _json("The process answers.", ok), **error_responses(ANY_REQUEST)}}


def readiness() -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Readiness"}
    return {
        "responses": {
            "200": _json("Ready: the broker is connected and tokens can be checked.", schema),
            **error_responses(ANY_REQUEST),
            "503": _json("Not ready: the broker or the token database is missing.", schema),
        }
    }


def model_list() -> dict[str, Any]:
    return {
        "security": [{"bearer": []}],
        "responses": {
            "200": _json(
                "The models this token may use that a live consumer serves.",
                {"$ref": "#/components/schemas/ModelList"},
            ),
            **error_responses((*ANY_REQUEST, *AUTHENTICATION)),
        },
    }


def model_card() -> dict[str, Any]:
    return {
        "security": [{"bearer": []}],
        "responses": {
            "200": _json(
                "The model, served and usable by this token.", {"$ref": "#/components/schemas/Model"}
            ),
            **error_responses((*ANY_REQUEST, *AUTHENTICATION, errors.MODEL_NOT_FOUND)),
        },
    }


def forwarded(route: str, max_priority: int) -> dict[str, Any]:
    """The description of a forwarded call to ``route`` on a priority scale of 0 to ``max_priority``."""
    properties: dict[str, Any] = {
        "model": {"type": "string", "minLength": 1, "description": "A model listed by `GET /v1/models`."}
    }
    answer: dict[str, Any] = {JSON: {"schema": {"type": "object"}}}
    description = "The backend's answer, relayed."
    if route in STREAMED_ROUTES:
        properties["stream"] = {
            "type": ["boolean", "null"],
            "description": "`true`: the answer comes as server-sent events, relayed as they are made.",
        }
        answer[EVENT_STREAM] = {"schema": {"$ref": "#/components/schemas/Event"}}
        description += (
            " Streamed (`stream: true`) as server-sent events ending with `data: [DONE]`; an error "
            "after the start (`stream_interrupted`, `shutting_down`, ...) comes as a last event "
            '`data: {"error": {...}}`.'
        )
    return {
        "security": [{"bearer": []}],
        "parameters": _headers(max_priority),
        "requestBody": {
            "required": True,
            "description": "The OpenAI (or vLLM) request, relayed byte for byte. The dispatcher reads "
            "`model` (and `stream`); the model's server checks the rest and answers its own errors.",
            "content": {
                JSON: {
                    "schema": {
                        "type": "object",
                        "required": ["model"],
                        "properties": properties,
                        "additionalProperties": True,
                    }
                }
            },
        },
        "responses": {
            "200": {"description": description, "headers": dict(_REQUEST_ID), "content": answer},
            **error_responses(FORWARDED_CALL),
            "default": {
                "description": "An error the model's server answered, relayed untouched.",
                "content": {JSON: {"schema": _ERROR_REF}},
            },
        },
    }


def _headers(max_priority: int) -> list[dict[str, Any]]:
    return [
        {
            "name": "X-Priority",
            "in": "header",
            "required": False,
            "description": f"Lower this request's priority below its token's (0-{max_priority}): a value "
            "above the token's priority is lowered to it, a negative one raised to 0.",
            "schema": {"type": "integer"},
        },
        {
            "name": "X-Request-Timeout",
            "in": "header",
            "required": False,
            "description": "Seconds the client waits at most; shortens the server's deadline (the "
            "request is answered 504 `deadline_exceeded` once it passes).",
            "schema": {"type": "number", "exclusiveMinimum": 0},
        },
        {
            "name": "X-Request-Id",
            "in": "header",
            "required": False,
            "description": "Echoed in the response and in both services' logs (its first 64 characters).",
            "schema": {"type": "string"},
        },
    ]


def finish(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's description, corrected: the components above, and no 422 (never answered)."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(BEARER)
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(SCHEMAS)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    return schema
