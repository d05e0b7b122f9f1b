"""Robust connections to one of several broker nodes, as ``RABBITMQ_URL`` lists them.

``RABBITMQ_URL`` names one node, or several separated by commas (the nodes of
one cluster, on VMs where no load balancer or Kubernetes Service stands in
front of them). aio-pika's robust connection keeps one URL and reconnects to
it; :class:`NodeListConnection` is that connection, moved on to the next node
of the list whenever an attempt fails or an established connection is lost,
so that a service follows the cluster when the node it used goes away.

Both services open two of these (see ``docs/architecture.md``): one that only
publishes and one that only consumes, so that a memory or disk alarm, which
blocks publishing connections, never holds back acks or replies being read.
URLs are only ever shown without their password (:func:`redact`).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection, TimeoutType
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

SCHEMES = ("amqp", "amqps")


def parse_urls(value: str) -> list[str]:
    """The node URLs of a ``RABBITMQ_URL`` (comma-separated), checked; :class:`ValueError` naming the
    faulty entry by its position and its password-free form if one is not a usable AMQP URL."""
    entries = [entry.strip() for entry in value.split(",")]
    if not any(entries):
        raise ValueError("RABBITMQ_URL is empty")
    urls = []
    for number, entry in enumerate(entries, start=1):
        where = f"RABBITMQ_URL entry {number} of {len(entries)}"
        if not entry:
            raise ValueError(f"{where} is empty (a stray comma?)")
        try:
            url = URL(entry)
            port = url.port
        except ValueError:
            raise ValueError(f"{where} is not a URL (a bad port or character?)") from None
        if url.scheme not in SCHEMES:
            raise ValueError(f"{where} ({redact(entry)}) must start with amqp:// or amqps://")
        if not url.host:
            raise ValueError(f"{where} ({redact(entry)}) names no host")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"{where} ({redact(entry)}) has a port out of range")
        urls.append(entry)
    if len({URL(url).scheme for url in urls}) > 1:
        raise ValueError("RABBITMQ_URL mixes amqp:// and amqps:// nodes: use one or the other")
    return urls


def redact(url: str) -> str:
    """``url`` as it may appear in a log line or an error: its password masked, nothing else lost."""
    try:
        parsed = URL(url)
        if parsed.password is not None:
            parsed = parsed.with_password("***")
        return str(parsed.with_query(None))
    except ValueError:
        return "(an unreadable URL)"


class NodeListConnection(aio_pika.RobustConnection):
    """A robust connection that tries the next node of its list after each failure or loss.

    aio-pika calls :meth:`_on_connection_close` both when an established connection
    drops and when an attempt to connect fails, and each new attempt connects to
    ``self.url``: moving ``self.url`` on there is all the failover needs. With a single
    node this is aio-pika's own behaviour.
    """

    def __init__(self, urls: list[str], start: int = 0, **kwargs: Any) -> None:
        self._nodes = [URL(url) for url in urls]
        self._next = start % len(self._nodes)
        super().__init__(self._nodes[self._next], **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if len(self._nodes) > 1 and not self._close_called:
            self._next = (self._next + 1) % len(self._nodes)
            self.url = self._nodes[self._next]
        await super()._on_connection_close(closing)


async def connect(
    urls: list[str],
    *,
    name: str,
    reconnect_interval: float,
    ssl_context: ssl.SSLContext | None = None,
    timeout: TimeoutType = None,
) -> AbstractRobustConnection:
    """A robust connection to the first node of ``urls`` that answers, named ``name`` on the broker.

    Each node is tried once, in order; if none answers, the last failure is raised
    (as a single URL's would be), so that a service started without its broker says so.
    """
    failure: BaseException | None = None
    for start in range(len(urls)):
        connection = NodeListConnection(
            urls,
            start,
            ssl_context=ssl_context,
            client_properties={"connection_name": name},
            reconnect_interval=reconnect_interval,
        )
        try:
            await connection.connect(timeout)
        except CONNECTION_EXCEPTIONS as exc:
            failure = exc
            await connection.close()
            continue
        return connection
    assert failure is not None
    raise failure
