"""The little of ASGI the simulator needs: reading a body, sending answers, noticing a client leave.

Written against the raw protocol rather than a framework because the simulator
shares a small machine with the system it measures, and every microsecond it
spends per request is one the measured system does not get.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream; charset=utf-8"


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | None = JSON,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, content: Any) -> None:
    await send_bytes(send, status, orjson.dumps(content))


async def start_stream(send: Send) -> None:
    """Start a server-sent event stream; each later ``send_event`` goes out at once."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", EVENT_STREAM)]})


async def send_event(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


class DisconnectWatch:
    """Cancels the current task when the client disconnects, and swallows that cancellation.

    uvicorn does not fail ``send`` once the client is gone, so without this a
    request would hold its slot and keep generating for nobody. Use as
    ``with DisconnectWatch(receive) as watch:`` after the body was read; after
    the block, ``watch.gone`` tells whether the client left.
    """

    __slots__ = ("_receive", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = False

    def __enter__(self) -> DisconnectWatch:
        task = asyncio.current_task()
        assert task is not None, "DisconnectWatch needs a running task"
        self._task = task
        self._watcher = asyncio.create_task(self._watch())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._watcher.cancel()
        if self.gone and exc_type is asyncio.CancelledError:
            self._task.uncancel()
            return True
        return False

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._task.cancel()
