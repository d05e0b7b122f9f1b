"""A TCP proxy a test can cut and restore: a database outage without touching the shared database.

It can also stand in front of several broker nodes (``fallbacks``): each new
connection goes to the first node that accepts it, so a service given the
proxy's address moves to another node when its own goes away, as a Kubernetes
Service would move it. :class:`ThreadedProxy` runs one on its own event loop in
a thread, so a test that blocks (stopping a node) does not stall the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from harness.stack import free_port


class TcpProxy:
    def __init__(
        self, target_host: str, target_port: int, fallbacks: tuple[tuple[str, int], ...] = ()
    ) -> None:
        self.target = (target_host, target_port)
        self.targets = [self.target, *fallbacks]
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones, as a database going away would."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for target in self.targets:
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(*target), 5)
            except (OSError, TimeoutError):
                continue
            break
        else:
            writer.close()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)


class ThreadedProxy:
    """A :class:`TcpProxy` served by an event loop of its own, in a daemon thread."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.proxy.port

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
