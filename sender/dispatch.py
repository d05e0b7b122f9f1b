"""Admission and relay: the logic between an HTTP request and the broker.

Admission refuses early what cannot be served well (unknown model, no live
consumer, queue deeper than the token's threshold). Relay turns the replies of
one request back into an HTTP response, whole or streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from contract import Reply, Request, errors, servable_model_name
from sender.broker import BrokerUnavailable
from sender.calls import Calls, PendingCall, PublishFailed
from sender.errors import ApiError
from sender.queue_stats import QueueStatsCache
from sender.settings import SenderSettings
from sender.tokens import Token


def effective_priority(token: Token, requested: str | None, max_priority: int) -> int:
    """The token's priority, or the lower one the request asks for with ``X-Priority``,
    within the queue's scale (0 to ``max_priority``)."""
    ceiling = max(0, min(token.priority, max_priority))
    if requested is None:
        return ceiling
    try:
        value = int(requested.strip())
    except ValueError:
        raise ApiError(errors.INVALID_PRIORITY) from None
    return max(0, min(value, ceiling))


def request_timeout(requested: str | None, ceiling: float) -> float:
    """Seconds the request may take in all: the server's deadline, or the shorter one the client
    asks for with ``X-Request-Timeout`` (a client that gives up sooner should not keep a GPU busy)."""
    if requested is None:
        return ceiling
    try:
        value = float(requested.strip())
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ApiError(errors.INVALID_REQUEST_TIMEOUT)
    return min(value, ceiling)


class Dispatcher:
    def __init__(self, calls: Calls, queue_stats: QueueStatsCache, settings: SenderSettings) -> None:
        self._calls = calls
        self._queue_stats = queue_stats
        self._settings = settings

    async def admit(self, model: str, token: Token) -> None:
        """Raise the error the client should get if ``model`` cannot take this request now."""
        if not servable_model_name(model):
            raise model_not_found(model)
        try:
            stats = await self._queue_stats.get(model)
            if not stats.exists or stats.consumers == 0:
                # Refusing is rare: make sure with numbers newer than, say, a consumer's announcement.
                stats = await self._queue_stats.get(model, fresh=True)
        except (BrokerUnavailable, TimeoutError, ConnectionError) as exc:
            raise self._unavailable(errors.BROKER_UNAVAILABLE) from exc
        if not stats.exists:
            raise model_not_found(model)
        if stats.consumers == 0 and not self._settings.queue_without_consumers:
            raise self._unavailable(
                errors.MODEL_UNAVAILABLE, f"no server is available for model `{model}` right now"
            )
        if stats.messages >= self._settings.max_queued_per_model:
            raise self._unavailable(
                errors.OVERLOADED,
                f"the dispatcher is overloaded: too many requests are waiting for model `{model}`",
            )
        if stats.messages >= token.threshold:
            raise ApiError(
                errors.QUEUE_FULL,
                f"too many requests are waiting for model `{model}`; retry later",
                retry_after=self._settings.retry_after_seconds,
            )

    async def forward(
        self,
        model: str,
        path: str,
        body: bytes,
        *,
        stream: bool,
        priority: int,
        request_id: str,
        receive: Receive,
        on_call: Callable[[PendingCall], None] = lambda _: None,
        timeout: float,
    ) -> Response:
        """Queue the request and answer with the backend's reply.

        ``receive`` is the client connection's ASGI receive: if the client goes
        away before the answer starts, the request is cancelled (skipped if still
        queued, aborted if running) rather than served to nobody.
        """
        deadline = time.time() + timeout
        request = Request(
            path=path, body=body, stream=stream, priority=priority, deadline=deadline, request_id=request_id
        )
        try:
            call = self._calls.publish(model, request)
        except PublishFailed as exc:
            raise self._unavailable(errors.QUEUE_UNAVAILABLE) from exc
        on_call(call)
        watcher = asyncio.ensure_future(_watch_disconnect(receive, call))
        try:
            first = await call.next(deadline - time.time())
        except TimeoutError:
            call.close()
            raise deadline_exceeded() from None
        except BaseException:
            call.close()
            raise
        finally:
            watcher.cancel()
        if call.abandoned:
            call.close()
            return Response(status_code=499)  # nobody is there to read it
        if call.publish_error is not None:
            call.close()
            raise self._unavailable(errors.QUEUE_UNAVAILABLE)
        if first.status is None:
            call.close()
            raise ApiError(errors.BAD_GATEWAY, first.error)
        headers = {"content-type": first.content_type or "application/json"}
        if first.last:
            call.close()
            return Response(first.body, status_code=first.status, headers=headers)
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        return RelayResponse(call, first, deadline, status_code=first.status, headers=headers)

    def _unavailable(self, kind: errors.ErrorKind, message: str | None = None) -> ApiError:
        return ApiError(kind, message, retry_after=self._settings.retry_after_seconds)


async def _watch_disconnect(receive: Receive, call: PendingCall) -> None:
    """Abandon ``call`` when the client disconnects (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    call.abandon()


_END_OF_STREAM = b"data: [DONE]\n\n"


class RelayResponse(Response):
    """A streamed answer, relayed piece by piece as the replies arrive.

    Plain ASGI rather than Starlette's ``StreamingResponse``: that one runs a
    generator inside an anyio task group per response, which cost about a fifth
    of the sender's CPU on streamed answers. The client's disconnect is watched
    here too, and ends (and cancels) the request.
    """

    def __init__(
        self, call: PendingCall, first: Reply, deadline: float, *, status_code: int, headers: dict[str, str]
    ) -> None:
        self.status_code = status_code
        self.background = None
        self.init_headers(headers)
        self._call = call
        self._first = first
        self._deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = self._call
        watcher = asyncio.ensure_future(_watch_disconnect(receive, call))
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            reply = self._first
            complete = False
            while not call.abandoned:
                chunk = reply.body
                # Once the backend's own end of stream went out, a late error (the consumer lost
                # its connection before saying "last") changes nothing for the client.
                complete = complete or chunk.endswith(_END_OF_STREAM)
                if reply.error is not None and not complete:
                    chunk += errors.STREAM_INTERRUPTED.sse_event(reply.error)
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if reply.last:
                    break
                try:
                    reply = await call.next(self._deadline - time.time())
                except TimeoutError:
                    if complete:
                        break
                    event = errors.DEADLINE_EXCEEDED.sse_event("the request ran past its deadline")
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client is gone; the request is cancelled below
        except asyncio.CancelledError:
            # The server's shutdown grace ran out: say so, rather than just dropping the stream.
            with contextlib.suppress(Exception):
                event = errors.SHUTTING_DOWN.sse_event()
                await send({"type": "http.response.body", "body": event, "more_body": False})
            raise
        finally:
            watcher.cancel()
            call.close()


def model_not_found(model: str) -> ApiError:
    return ApiError(
        errors.MODEL_NOT_FOUND,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
    )


def deadline_exceeded() -> ApiError:
    return ApiError(errors.DEADLINE_EXCEEDED)
