"""Relay: queue an admitted request and turn its replies back into an HTTP response, whole or streamed.

The caller keeps the :class:`~sender.calls.PendingCall` that :meth:`Relay.publish`
returns: once the response is sent, its last piece says what the request
used, for accounting. If the client goes away before the answer is complete,
the request is cancelled (skipped if still queued, aborted if running) rather
than served to nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

import contract
from contract import Reply, Request, errors
from contract.errors import clip
from sender.admission import AdmittedRequest, Refused, parallel_refusal
from sender.backlog import Backlog
from sender.broker_hold import BrokerHold, Retry
from sender.calls import Calls, PendingCall, PublishFailed
from sender.errors import ApiError
from sender.settings import SenderSettings

_END_OF_STREAM = b"data: [DONE]\n\n"


class _StillAsleep(Exception):
    """The cold-start budget ran out and the model still has no live consumer."""


class Relay:
    def __init__(
        self,
        calls: Calls,
        backlog: Backlog,
        hold: BrokerHold,
        settings: SenderSettings,
        *,
        has_consumer: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        """``has_consumer`` says whether a model has a live consumer now (for requests that wait
        for a sleeping model, up to ``settings.cold_start_seconds``, 0: their deadline)."""
        self._calls = calls
        self._backlog = backlog
        self._hold = hold
        self._settings = settings
        self._retry_after = settings.retry_after_seconds
        self._cold_start = settings.cold_start_seconds
        self._has_consumer = has_consumer
        self._max_priority = settings.max_priority
        self._fair_share = settings.fair_share

    def wire_priority(self, admitted: AdmittedRequest) -> int:
        """The message priority of ``admitted``: its level, and within the level, a sub-level that
        sinks with the token's own backlog (fair share: a token with nothing waiting goes ahead of
        the waiting requests of a token with many, at the same level)."""
        demotion = 0
        if self._fair_share:
            waiting = self._backlog.waiting(admitted.model, admitted.token.name)
            demotion = contract.demotion_for_backlog(waiting, self._max_priority)
        return contract.wire_priority(admitted.priority, demotion, self._max_priority)

    async def publish(self, admitted: AdmittedRequest, receive: Receive) -> PendingCall:
        """Queue the request, held a while if the broker cannot take it now (:mod:`sender.broker_hold`);
        503 ``queue_unavailable`` past that.

        The token's parallel limit is checked again right before publishing, with no await between
        the check and the count: requests admitted together cannot pass it together."""
        deadline = time.time() + admitted.timeout

        async def publish() -> PendingCall:
            refusal = parallel_refusal(self._backlog, admitted.token, self._settings)
            if refusal is not None:
                raise Refused(refusal, admitted)
            request = Request(
                path=admitted.path,
                body=admitted.body,
                stream=admitted.stream,
                priority=self.wire_priority(admitted),
                deadline=deadline,
                request_id=admitted.request_id,
            )
            try:
                return self._calls.publish(admitted.model, request, admitted.token.name)
            except PublishFailed as exc:
                raise Retry(ApiError(errors.QUEUE_UNAVAILABLE, retry_after=self._retry_after)) from exc

        return await self._hold.attempt(publish, receive=receive, deadline=deadline, since=admitted.asked_at)

    async def answer(self, call: PendingCall, receive: Receive, *, asleep: bool = False) -> Response:
        """The response to ``call``, once its first piece came; the :class:`ApiError` of a request
        that got none. ``receive`` is the client connection's: a disconnect abandons the call.
        ``asleep``: its model had no live consumer when it was queued."""
        watcher = asyncio.ensure_future(_watch_disconnect(receive, call))
        try:
            first = await self._first_piece(call, asleep)
            if not first.last and not call.stream and first.status is not None:
                first = await call.whole(first)  # larger than one broker message
        except TimeoutError:
            call.close()
            raise ApiError(errors.DEADLINE_EXCEEDED) from None
        except _StillAsleep:
            call.close()  # cancelled: a consumer that starts later skips it
            raise ApiError(
                errors.MODEL_UNAVAILABLE,
                f"model `{clip(call.model)}` is starting; no server took the request within "
                f"{self._cold_start:g} seconds, retry later",
                retry_after=self._retry_after,
            ) from None
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
            raise ApiError(errors.QUEUE_UNAVAILABLE, retry_after=self._retry_after)
        if call.overflowed:
            call.close()
            raise ApiError(errors.ANSWER_TOO_LARGE)
        if first.status is None:
            call.close()
            raise ApiError(errors.BAD_GATEWAY, first.error)
        headers = {"content-type": first.content_type or "application/json"}
        if first.last:
            call.close()
            return Response(first.body, status_code=first.status, headers=headers)
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        return RelayResponse(call, first, status_code=first.status, headers=headers)

    async def _first_piece(self, call: PendingCall, asleep: bool) -> Reply:
        """The first piece of the answer; a request for a sleeping model waits for a consumer only
        within the cold-start budget (once one is there, up to its deadline)."""
        budget_end = time.time() + self._cold_start
        if asleep and self._cold_start > 0 and self._has_consumer is not None and budget_end < call.deadline:
            try:
                return await call.next(budget_end - time.time())
            except TimeoutError:
                if not await self._has_consumer(call.model):
                    raise _StillAsleep from None
        return await call.next(call.deadline - time.time())


async def _watch_disconnect(receive: Receive, call: PendingCall) -> None:
    """Abandon ``call`` when the client disconnects (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    call.abandon()


class RelayResponse(Response):
    """A streamed answer, relayed piece by piece as the replies arrive.

    Plain ASGI rather than Starlette's ``StreamingResponse``: that one runs a
    generator inside an anyio task group per response, which cost about a fifth
    of the sender's CPU on streamed answers. The client's disconnect is watched
    here too, and ends (and cancels) the request.
    """

    def __init__(self, call: PendingCall, first: Reply, *, status_code: int, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.background = None
        self.init_headers(headers)
        self._call = call
        self._first = first

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
                if call.overflowed:
                    chunk = errors.CLIENT_TOO_SLOW.sse_event()
                elif reply.error is not None and not complete:
                    chunk += errors.STREAM_INTERRUPTED.sse_event(reply.error)
                if reply.last:
                    # The answer's last bytes and the end of the body in one write, not two.
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                try:
                    reply = await call.next(call.deadline - time.time())
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
