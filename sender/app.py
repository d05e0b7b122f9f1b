"""The sender's HTTP API: OpenAI-compatible routes, thin, on top of :mod:`sender.services`.

Forwarded calls are served by :class:`sender.front.ForwardingFront` before
FastAPI sees them; they are declared here only for the OpenAPI description.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp

from contract import errors
from contract.errors import clip
from sender import openapi
from sender.admission import model_not_found
from sender.auth_throttle import AuthThrottle, FailureTable, parse_networks
from sender.errors import ApiError, error_response
from sender.front import ForwardingFront
from sender.services import Services
from sender.settings import SenderSettings

log = logging.getLogger(__name__)

JSON = "application/json"


def create_app(settings: SenderSettings | None = None) -> ASGIApp:
    settings = settings or SenderSettings()
    failures = FailureTable(
        limit=settings.auth_failure_limit,
        window=settings.auth_failure_window_seconds,
        block=settings.auth_block_seconds,
        max_clients=settings.auth_failure_clients,
    )
    throttle: AuthThrottle | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings)
        await services.start()
        app.state.services = services
        if throttle is not None:
            throttle.known = services.tokens.known
            throttle.on_refused = services.metrics.rejected.labels(errors.TOO_MANY_AUTH_FAILURES.reason).inc
        try:
            yield
        finally:
            await services.close()

    app = FastAPI(title="LLM dispatcher", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/health/live", openapi_extra=openapi.liveness())
    async def live() -> Response:
        """Liveness: the process answers."""
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/health", openapi_extra=openapi.readiness())
    @app.get("/health/ready", openapi_extra=openapi.readiness())
    async def ready(request: Request) -> Response:
        """Readiness: the broker is connected and tokens can be checked: the token database
        answers, or (during an outage) recently seen tokens are cached and keep working.
        Also ``GET /health``, where tools that validate a vLLM endpoint (guidellm, ...) look."""
        services = _services(request)
        broker_ok = services.broker.connected
        db_ok = await services.database_reachable()
        ok = broker_ok and (db_ok or services.tokens.warm)
        body = orjson.dumps({"status": "ok" if ok else "unavailable", "broker": broker_ok, "database": db_ok})
        return Response(body, status_code=200 if ok else 503, media_type=JSON)

    @app.get("/v1/models", openapi_extra=openapi.model_list())
    async def list_models(request: Request) -> Response:
        services = _services(request)
        token = await services.admission.authenticate(request)
        registry = services.registry
        asleep = [model for model in registry.configured if token.may_use(model) and registry.asleep(model)]
        waiting = await services.waiting(asleep)
        cards = [card for card in registry.cards(waiting) if token.may_use(str(card.get("id")))]
        return Response(orjson.dumps({"object": "list", "data": cards}), media_type=JSON)

    @app.get("/v1/models/{model:path}", openapi_extra=openapi.model_card())
    async def get_model(model: str, request: Request) -> Response:
        services = _services(request)
        token = await services.admission.authenticate(request)
        if not token.may_use(model):
            raise model_not_found(model)
        registry = services.registry
        asleep = model in registry.configured and registry.asleep(model)
        card = registry.card(model, waiting=asleep and model in await services.waiting([model]))
        if card is None:
            raise model_not_found(model)
        return Response(orjson.dumps(card), media_type=JSON)

    async def relayed_call() -> Response:
        """Relayed to the model's backend: a JSON body naming a ``model``."""
        raise _served_by_front()

    routes = settings.relayed_routes
    for route in sorted(routes):
        # Declared for the OpenAPI description and for the 405 (with ``Allow``) of other methods.
        app.add_api_route(
            route,
            relayed_call,
            methods=["POST"],
            openapi_extra=openapi.forwarded(route, settings.max_priority),
            name=f"relay {route}",
        )

    def description() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.finish(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = description  # type: ignore[method-assign]
    throttle = AuthThrottle(
        ForwardingFront(app, settings.max_header_bytes, routes),
        failures,
        parse_networks(settings.trusted_proxies),
    )
    return throttle


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _served_by_front() -> Exception:
    return RuntimeError("forwarded calls are served by ForwardingFront, never by FastAPI")


async def _api_error(request: Request, exc: Exception) -> Response:
    """A refusal on a FastAPI route (``/v1/models`` without a valid token, an unknown model card):
    counted and logged like the forwarded calls' refusals."""
    assert isinstance(exc, ApiError)
    services: Services | None = getattr(request.app.state, "services", None)
    if services is not None:
        services.accounting.finished(
            request_id=(request.headers.get("x-request-id") or uuid.uuid4().hex)[:64],
            path=request.url.path,
            status=exc.status,
            code=exc.code,
            started=time.perf_counter(),
            first_piece_at=None,
            request=None,
            call=None,
        )
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    where = f"{clip(request.method, 20)} {clip(request.url.path)}"
    if exc.status_code == 404:
        return ApiError(errors.UNKNOWN_URL, f"no route for {where}").response()
    if exc.status_code == 405:
        response = ApiError(errors.METHOD_NOT_ALLOWED, f"method not allowed: {where}").response()
        allow = (exc.headers or {}).get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response
    return error_response(exc.status_code, clip(str(exc.detail)))


async def _validation_error(request: Request, exc: Exception) -> Response:
    return ApiError(errors.INVALID_REQUEST_PARAMS).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", clip(request.method, 20), clip(request.url.path))
    return ApiError(errors.INTERNAL_ERROR).response()
