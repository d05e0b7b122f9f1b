"""The fast path for forwarded calls: plain ASGI in front of FastAPI.

FastAPI's middleware, routing and dependency layers cost about a fifth of the
sender's CPU per request, and the forwarded calls (``POST`` to one of the
relayed routes of :mod:`contract.routes`) use none of them: they read the raw
body and answer raw bytes. :class:`ForwardingFront` sends those straight
through admission, relay and accounting, and everything else to FastAPI.

It is also where a request is refused before anything is read of it: headers
too large, an ``Authorization`` header sent more than once (a proxy in front
could pick another one than we do), and a ``POST`` whose path is not exactly
a route (dot segments, percent-encoding, backslashes, empty segments, a query
string: the sender matches the raw path as sent, never a decoded or
normalised one, so that no spelling of a backend's other routes gets through).
"""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from contract import errors
from contract.errors import clip
from sender.admission import AdmittedRequest, Refused
from sender.calls import PendingCall
from sender.errors import ApiError
from sender.services import Services

log = logging.getLogger(__name__)


class ForwardingFront:
    def __init__(self, app: FastAPI, max_header_bytes: int, routes: frozenset[str]) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.routes = routes
        """The relayed routes, exact paths."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = _header_error(scope, self.max_header_bytes)
        route = None
        if error is None and scope["method"] == "POST":
            try:
                route = relayed_route(scope, self.routes)
            except ApiError as exc:
                error = exc
        if error is not None:
            await self._refuse(scope, receive, send, error)
        elif route is not None:
            await self._forward(scope, receive, send, route)
        else:
            await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
        """Answer ``error`` before anything is read of the request; counted and logged as any call."""
        started = time.perf_counter()
        response = error.response()
        request_id = _request_id(scope)
        response.headers["x-request-id"] = request_id
        await response(scope, receive, send)
        services: Services | None = getattr(self.app.state, "services", None)
        if services is not None:
            services.accounting.finished(
                request_id=request_id,
                path=_raw_target(scope),
                status=response.status_code,
                code=error.code,
                started=started,
                first_piece_at=None,
                request=None,
                call=None,
            )

    async def _forward(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        started = time.perf_counter()
        scope["app"] = self.app
        services: Services = self.app.state.services
        request = Request(scope, receive)
        request_id = _request_id(scope)
        services.metrics.in_flight.inc()
        first_piece_at: float | None = None

        async def send_noting_first_piece(message: Message) -> None:
            nonlocal first_piece_at
            if first_piece_at is None and message["type"] == "http.response.body":
                first_piece_at = time.perf_counter()
            await send(message)

        admitted: AdmittedRequest | None = None
        call: PendingCall | None = None
        code = None
        try:
            admitted = await services.admission.admit(request, path, request_id)
            call = await services.relay.publish(admitted, receive)
            response = await services.relay.answer(call, receive, asleep=admitted.asleep)
        except Refused as exc:
            admitted, response, code = exc.request, exc.response(), exc.code
        except ApiError as exc:
            response, code = exc.response(), exc.code
        except Exception:
            log.exception("unhandled error on POST %s", path)  # a relayed route: bounded
            response, code = ApiError(errors.INTERNAL_ERROR).response(), "internal_error"
        response.headers["x-request-id"] = request_id
        try:
            await response(scope, receive, send_noting_first_piece)
        finally:
            services.metrics.in_flight.dec()
            services.accounting.finished(
                request_id=request_id,
                path=path,
                status=response.status_code,
                code=code,
                started=started,
                first_piece_at=first_piece_at,
                request=admitted,
                call=call,
            )


def _header_error(scope: Scope, max_header_bytes: int) -> ApiError | None:
    """The refusal a request gets for its headers alone, if any."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    if sum(len(name) + len(value) for name, value in headers) > max_header_bytes:
        return ApiError(errors.HEADERS_TOO_LARGE)
    if sum(1 for name, _ in headers if name == b"authorization") > 1:
        return ApiError(errors.DUPLICATE_AUTHORIZATION)
    return None


def _request_id(scope: Scope) -> str:
    """The client's ``X-Request-Id`` (its first 64 characters), or a new one."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"x-request-id" and value:
            return value[:64].decode("latin-1")
    return uuid.uuid4().hex


def relayed_route(scope: Scope, routes: frozenset[str]) -> str | None:
    """The route a ``POST`` names: one of ``routes``, matched byte for byte on the raw path; None for
    a plain path that is none of them (FastAPI's 404 or 405); :class:`ApiError` ``invalid_path``
    for a path that could be read more than one way, or that carries a query string."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    problem = _path_problem(raw)
    if problem is None and scope.get("query_string"):
        problem = "a query string"
    if problem is not None:
        shown = clip(raw.decode("latin-1"))
        raise ApiError(
            errors.INVALID_PATH,
            f"invalid request path `{shown}` ({problem}): paths are matched exactly, without dot "
            "segments, percent-encoding, backslashes, empty segments or a query string",
        )
    path = raw.decode("ascii")
    return path if path in routes else None


def _path_problem(raw: bytes) -> str | None:
    if not raw.startswith(b"/"):
        return "not an absolute path"
    if b"%" in raw:
        return "percent-encoding"
    if b"\\" in raw:
        return "a backslash"
    if any(byte <= 0x20 or byte >= 0x7F for byte in raw):
        return "a character that must be encoded"
    if raw == b"/":
        return None
    segments = raw[1:].split(b"/")
    if any(segment in (b".", b"..") for segment in segments):
        return "a dot segment"
    if any(not segment for segment in segments):
        return "an empty segment"
    return None


def _raw_target(scope: Scope) -> str:
    """The path and query a client sent, as much of it as a log line may quote."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string") or b""
    target = raw + b"?" + query if query else raw
    return clip(target.decode("latin-1"))
