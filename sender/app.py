"""The sender's HTTP API: OpenAI-compatible routes, thin, on top of :mod:`sender.dispatch`."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract import errors
from sender.broker import Broker
from sender.calls import Calls, PendingCall
from sender.database import async_database_url
from sender.dispatch import Dispatcher, effective_priority, model_not_found, request_timeout
from sender.errors import ApiError, error_response
from sender.limits import RateLimiter
from sender.metrics import SenderMetrics
from sender.migrate import kind_of, schema_scripts, schema_version
from sender.openapi import AUTHENTICATED, add_security_scheme, forwarded
from sender.queue_stats import QueueStatsCache
from sender.registry import ModelRegistry
from sender.settings import SenderSettings
from sender.tokens import Token, TokenStore
from sender.usage_rows import UsageRecorder

log = logging.getLogger(__name__)

JSON = "application/json"


class Services:
    """What the routes need, built once per process by the lifespan."""

    def __init__(self, settings: SenderSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine = create_async_engine(
            async_database_url(settings.database_url),
            pool_size=settings.db_pool_size,
            pool_pre_ping=True,
            pool_recycle=1800,
        )
        self.registry = ModelRegistry(settings.max_priority)
        self.metrics = SenderMetrics(token_label=settings.metrics_token_label)
        self.tokens = TokenStore(
            self.engine,
            ttl=settings.token_cache_seconds,
            negative_ttl=settings.unknown_token_cache_seconds,
            max_entries=settings.token_cache_size,
            stale_ttl=settings.token_stale_seconds,
            timeout=settings.db_timeout_seconds,
            on_query=self.metrics.token_queries.inc,
        )
        self.limiter = RateLimiter(
            self.engine, sync_seconds=settings.rate_sync_seconds, timeout=settings.db_timeout_seconds
        )
        self.usage = UsageRecorder(
            self.engine,
            flush_seconds=settings.usage_flush_seconds,
            max_rows=settings.usage_buffer_rows,
            on_dropped=self.metrics.usage_rows_dropped.inc,
            on_written=self.metrics.usage_rows_written.inc,
        )
        self.broker = Broker(settings.rabbitmq_url, reconnect_interval=settings.broker_reconnect_seconds)
        self.queue_stats = QueueStatsCache(
            self.broker, ttl=settings.queue_stats_seconds, on_read=self.metrics.queue_read
        )
        self.calls = Calls(
            self.broker,
            on_published=self.queue_stats.published,
            on_taken=self.queue_stats.taken,
            liveness_interval=settings.liveness_seconds,
        )
        self.dispatcher = Dispatcher(self.calls, self.queue_stats, settings)
        self.metrics.broker_connected.set_function(lambda: 1.0 if self.broker.connected else 0.0)
        self._db_checked_at = 0.0
        self._db_ok = False

    async def database_reachable(self) -> bool:
        if time.monotonic() - self._db_checked_at < 1.0:
            return self._db_ok
        try:
            async with asyncio.timeout(2.0), self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
            self._db_ok = True
        except Exception as exc:
            log.warning("token database unreachable: %s", type(exc).__name__)
            self._db_ok = False
        self._db_checked_at = time.monotonic()
        return self._db_ok


def create_app(settings: SenderSettings | None = None) -> ASGIApp:
    settings = settings or SenderSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings)
        await services.broker.connect(
            on_reply=services.calls.on_reply,
            on_announcement=services.registry.receive,
            on_reconnect=services.metrics.broker_reconnects.inc,
        )
        services.calls.start()
        await _check_schema(services.engine)
        services.tokens.start()
        services.limiter.start()
        services.usage.start()
        # Consumers answer the roll call within milliseconds; waiting a moment
        # means the first /v1/models after start is already complete.
        await asyncio.sleep(settings.rollcall_wait_seconds)
        app.state.services = services
        try:
            yield
        finally:
            services.calls.close()
            services.queue_stats.close()
            await services.broker.close()
            await services.usage.close()
            await services.limiter.close()
            await services.tokens.close()
            await services.engine.dispose()

    app = FastAPI(title="LLM dispatcher", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    forwarded_call = forwarded(settings.max_priority)

    @app.get("/health/live")
    async def live() -> Response:
        """Liveness: the process answers."""
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/health/ready")
    async def ready(request: Request) -> Response:
        """Readiness: the broker is connected and tokens can be checked: the token database
        answers, or (during an outage) recently seen tokens are cached and keep working."""
        services = _services(request)
        broker_ok = services.broker.connected
        db_ok = await services.database_reachable()
        ok = broker_ok and (db_ok or services.tokens.warm)
        body = orjson.dumps({"status": "ok" if ok else "unavailable", "broker": broker_ok, "database": db_ok})
        return Response(body, status_code=200 if ok else 503, media_type=JSON)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (no token: keep this path off the public ingress)."""
        registry = _services(request).metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", openapi_extra=AUTHENTICATED)
    async def list_models(request: Request) -> Response:
        services = _services(request)
        token = await _authenticate(request, services)
        cards = [card for card in services.registry.cards() if token.may_use(str(card.get("id")))]
        return Response(orjson.dumps({"object": "list", "data": cards}), media_type=JSON)

    @app.get("/v1/models/{model:path}", openapi_extra=AUTHENTICATED)
    async def get_model(model: str, request: Request) -> Response:
        services = _services(request)
        token = await _authenticate(request, services)
        card = services.registry.card(model)
        if card is None or not token.may_use(model):
            raise model_not_found(model)
        return Response(orjson.dumps(card), media_type=JSON)

    # Declared for the OpenAPI description; requests reach them through ForwardingFront.
    @app.post("/v1/{endpoint:path}", openapi_extra=forwarded_call)
    async def openai_call(endpoint: str, request: Request) -> Response:
        """Any OpenAI call whose JSON body names a ``model``: chat, completions, embeddings, ..."""
        return await _forward(request, "/v1/" + endpoint)

    @app.post("/tokenize", openapi_extra=forwarded_call)
    async def tokenize(request: Request) -> Response:
        return await _forward(request, "/tokenize")

    @app.post("/detokenize", openapi_extra=forwarded_call)
    async def detokenize(request: Request) -> Response:
        return await _forward(request, "/detokenize")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_security_scheme(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return ForwardingFront(app, settings.max_header_bytes)


async def _check_schema(engine: AsyncEngine) -> None:
    """Say plainly when the database was not migrated: every lookup would fail otherwise, unexplained."""
    try:
        async with asyncio.timeout(5):
            version = await schema_version(engine)
        expected = schema_scripts(kind_of(engine))[-1].version
    except Exception as exc:
        log.warning("could not read the token database's schema version: %s", type(exc).__name__)
        return
    if version < expected:
        log.error(
            "the token database is at schema version %d, this sender needs %d: "
            "run `python -m sender.admin migrate`",
            version,
            expected,
        )


class ForwardingFront:
    """Sends the forwarded calls (``POST /v1/...``, ``/tokenize``, ``/detokenize``) straight to
    their handler and everything else to FastAPI.

    FastAPI's middleware, routing and dependency layers cost about a fifth of the
    sender's CPU per request, and the forwarded calls use none of them: they read
    the raw body and answer raw bytes.
    """

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
        request = Request(scope, receive)
        request_id = (request.headers.get("x-request-id") or uuid.uuid4().hex)[:64]
        request.state.request_id = request_id
        metrics = _services(request).metrics
        metrics.in_flight.inc()
        first_piece_at: list[float] = []

        async def send_noting_first_piece(message: Message) -> None:
            if not first_piece_at and message["type"] == "http.response.body":
                first_piece_at.append(time.perf_counter())
            await send(message)

        code = None
        request.state.call = None
        try:
            response = await _forward(request, scope["path"])
        except ApiError as exc:
            response, code = exc.response(), exc.code
        except Exception as exc:
            response, code = await _internal_error(request, exc), "internal_error"
        response.headers["x-request-id"] = request_id
        try:
            await response(scope, receive, send_noting_first_piece)
        finally:
            metrics.in_flight.dec()
            self._account(request, response.status_code, code, started, first_piece_at)
            if request.state.call is not None:
                _record_usage(request, response.status_code, started)

    def _account(
        self, request: Request, status: int, code: str | None, started: float, first_piece_at: list[float]
    ) -> None:
        """The request's metrics and its log line."""
        seconds = time.perf_counter() - started
        fields = dict(getattr(request.state, "log", {}))
        metrics = _services(request).metrics
        if code is not None:
            metrics.rejected.labels(errors.reason_of(code)).inc()
        if "model" in fields:
            metrics.answered(fields["model"], fields["token"], status, fields["priority"], seconds)
            if first_piece_at and code is None:
                metrics.first_piece(fields["model"], fields["priority"], first_piece_at[0] - started)
        if log.isEnabledFor(logging.INFO):
            fields.update(
                request_id=request.state.request_id,
                path=request.url.path,
                status=status,
                code=code,
                ms=round(seconds * 1000, 1),
            )
            log.info("request", extra={"fields": fields})


def _record_usage(request: Request, status: int, started: float) -> None:
    """The usage row of a request that reached a model queue; its tokens count against the tpm limit."""
    services = _services(request)
    call: PendingCall = request.state.call
    token: Token = request.state.token
    final = call.final
    prompt = (final.prompt_tokens or 0) if final is not None else 0
    completion = (final.completion_tokens or 0) if final is not None else 0
    services.limiter.spent(token, prompt + completion)
    if not services.settings.usage_accounting:
        return
    fields = request.state.log
    services.usage.record(
        {
            "token_id": token.id or None,
            "token_name": token.name,
            "model": fields["model"],
            "path": request.url.path[:255],
            "request_id": request.state.request_id,
            "status": status,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "queue_ms": final.queue_ms if final is not None else None,
            "total_ms": round((time.perf_counter() - started) * 1000),
            "priority": fields["priority"],
            "streamed": fields["stream"],
        }
    )


def _header_bytes(scope: Scope) -> int:
    return sum(len(name) + len(value) for name, value in scope["headers"])


def _forwarded(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


async def _forward(request: Request, path: str) -> Response:
    services = _services(request)
    token = await _authenticate(request, services)
    body = await _read_body(request, services.settings.max_body_bytes, services.settings.body_timeout_seconds)
    payload = _parse_json(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(errors.MISSING_MODEL, param="model")
    if not token.may_use(model):
        raise model_not_found(model)  # as if it did not exist: do not tell which models do
    stream = payload.get("stream") is True
    priority = effective_priority(token, request.headers.get("x-priority"), services.settings.max_priority)
    timeout = request_timeout(
        request.headers.get("x-request-timeout"), token.deadline_seconds(services.settings.deadline_seconds)
    )
    request.state.log = {"token": token.name, "model": model, "priority": priority, "stream": stream}
    request.state.token = token
    await services.dispatcher.admit(model, token)
    retry_after = await services.limiter.admit(token)
    if retry_after is not None:
        raise ApiError(errors.RATE_LIMIT_EXCEEDED, retry_after=retry_after)

    def remember(call: PendingCall) -> None:
        request.state.call = call

    return await services.dispatcher.forward(
        model,
        path,
        body,
        stream=stream,
        priority=priority,
        request_id=request.state.request_id,
        receive=request.receive,
        on_call=remember,
        timeout=timeout,
    )


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _authenticate(request: Request, services: Services) -> Token:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise ApiError(errors.INVALID_API_KEY, "missing bearer token: send 'Authorization: Bearer <token>'")
    try:
        token = await services.tokens.lookup(secret)
    except Exception as exc:  # TokenUnavailable, or anything the lookup could not survive
        log.warning("token lookup failed: %s", type(exc.__cause__ or exc).__name__)
        raise ApiError(errors.AUTH_UNAVAILABLE, retry_after=services.settings.retry_after_seconds) from exc
    if token is None:
        raise ApiError(errors.INVALID_API_KEY)
    if not token.enabled:
        raise ApiError(errors.TOKEN_DISABLED)
    if token.expired():
        raise ApiError(errors.TOKEN_EXPIRED)
    return token


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            errors.REQUEST_TIMEOUT,
            f"the request body was not received within {timeout:g} seconds",
            close=True,
        ) from None
    except ClientDisconnect:
        # Nobody reads the answer; 499 (as nginx logs it) marks the request in the log and metrics.
        raise ApiError(errors.CLIENT_DISCONNECTED) from None
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(errors.REQUEST_TOO_LARGE, f"request body is larger than {limit} bytes")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(errors.INVALID_JSON) from None
    if not isinstance(payload, dict):
        raise ApiError(errors.INVALID_JSON, "the request body must be a JSON object")
    return payload


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return ApiError(errors.UNKNOWN_URL, f"no route for {request.method} {request.url.path}").response()
    if exc.status_code == 405:
        return ApiError(errors.METHOD_NOT_ALLOWED, f"method {request.method} is not allowed here").response()
    return error_response(exc.status_code, str(exc.detail))


async def _validation_error(request: Request, exc: Exception) -> Response:
    return ApiError(errors.INVALID_REQUEST_PARAMS).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return ApiError(errors.INTERNAL_ERROR).response()
