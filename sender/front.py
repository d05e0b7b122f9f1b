"""The fast path for forwarded calls: plain ASGI in front of FastAPI.

FastAPI's middleware, routing and dependency layers cost about a fifth of the
sender's CPU per request, and the forwarded calls (``POST /v1/...``,
``/tokenize``, ``/detokenize``) use none of them: they read the raw body and
answer raw bytes. :class:`ForwardingFront` sends those straight through
admission, relay and accounting, and everything else to FastAPI.
"""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from contract import errors
from sender.admission import AdmittedRequest, Refused
from sender.calls import PendingCall
from sender.errors import ApiError
from sender.services import Services

log = logging.getLogger(__name__)


class ForwardingFront:
    def __init__(self, app: FastAPI, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _header_bytes(scope) > self.max_header_bytes:
            response = ApiError(errors.HEADERS_TOO_LARGE).response()
            await response(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST" and _forwarded(scope["path"]):
            await self._forward(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        scope["app"] = self.app
        services: Services = self.app.state.services
        request = Request(scope, receive)
        request_id = (request.headers.get("x-request-id") or uuid.uuid4().hex)[:64]
        path: str = scope["path"]
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
            call = services.relay.publish(admitted)
            response = await services.relay.answer(call, receive)
        except Refused as exc:
            admitted, response, code = exc.request, exc.response(), exc.code
        except ApiError as exc:
            response, code = exc.response(), exc.code
        except Exception:
            log.exception("unhandled error on POST %s", path)
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


def _header_bytes(scope: Scope) -> int:
    return sum(len(name) + len(value) for name, value in scope["headers"])


def _forwarded(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
