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

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from contract import Reply, Request, errors
from sender.admission import AdmittedRequest
from sender.broker_hold import BrokerHold, Retry
from sender.calls import Calls, PendingCall, PublishFailed
from sender.errors import ApiError

_END_OF_STREAM = b"data: [DONE]\n\n"


class Relay:
    def __init__(self, calls: Calls, hold: BrokerHold, *, retry_after: int) -> None:
        self._calls = calls
        self._hold = hold
        self._retry_after = retry_after

    async def publish(self, admitted: AdmittedRequest, receive: Receive) -> PendingCall:
        """Queue the request, held a while if the broker cannot take it now (:mod:`sender.broker_hold`);
        503 ``queue_unavailable`` past that."""
        request = Request(
            path=admitted.path,
            body=admitted.body,
            stream=admitted.stream,
            priority=admitted.priority,
            deadline=time.time() + admitted.timeout,
            request_id=admitted.request_id,
        )

        async def publish() -> PendingCall:
            try:
                return self._calls.publish(admitted.model, request)
            except PublishFailed as exc:
                raise Retry(ApiError(errors.QUEUE_UNAVAILABLE, retry_after=self._retry_after)) from exc

        return await self._hold.attempt(
            publish, receive=receive, deadline=request.deadline, since=admitted.asked_at
        )

    async def answer(self, call: PendingCall, receive: Receive) -> Response:
        """The response to ``call``, once its first piece came; the :class:`ApiError` of a request
        that got none. ``receive`` is the client connection's: a disconnect abandons the call."""
        watcher = asyncio.ensure_future(_watch_disconnect(receive, call))
        try:
            first = await call.next(call.deadline - time.time())
        except TimeoutError:
            call.close()
            raise ApiError(errors.DEADLINE_EXCEEDED) from None
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
                if reply.error is not None and not complete:
                    chunk += errors.STREAM_INTERRUPTED.sse_event(reply.error)
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if reply.last:
                    break
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
