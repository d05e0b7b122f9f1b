"""Clients that keep failing authentication are refused for a while, before their keys reach the cache
or the database.

A client is the connection's peer address as the ASGI scope gives it, or,
only when that peer is one of ``SENDER_TRUSTED_PROXIES``, the address its
``X-Forwarded-For`` names (the rightmost one that is not itself a trusted
proxy): a client cannot choose its identity with a header. After
``SENDER_AUTH_FAILURE_LIMIT`` answers of 401 to one client within
``SENDER_AUTH_FAILURE_WINDOW_SECONDS``, its requests get 429
``too_many_auth_failures`` with ``Retry-After`` for
``SENDER_AUTH_BLOCK_SECONDS``, except those whose bearer token is a known one
in the token cache (a valid client behind the same NAT keeps working).
Health routes are never refused. The table of clients is bounded
(``SENDER_AUTH_FAILURE_CLIENTS``, least recently failed forgotten first).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract import errors
from sender.errors import ApiError

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class _Client:
    window_start: float
    failures: int
    blocked_until: float = 0.0


class FailureTable:
    """Failed authentications per client, in fixed windows; bounded (LRU)."""

    def __init__(self, *, limit: int, window: float, block: float, max_clients: int) -> None:
        self.limit = limit
        self.window = window
        self.block = block
        self.max_clients = max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def blocked_for(self, client: str, now: float) -> float:
        """Seconds this client is still refused; 0 if it is not."""
        entry = self._clients.get(client)
        if entry is None or entry.blocked_until <= now:
            return 0.0
        return entry.blocked_until - now

    def failed(self, client: str, now: float) -> bool:
        """Count one failure; True if it is the one that blocks the client."""
        entry = self._clients.get(client)
        if entry is None or now - entry.window_start >= self.window:
            blocked_until = entry.blocked_until if entry is not None else 0.0
            entry = self._clients[client] = _Client(now, 0, blocked_until)
        self._clients.move_to_end(client)
        entry.failures += 1
        newly = entry.failures >= self.limit and entry.blocked_until <= now
        if newly:
            entry.blocked_until = now + self.block
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
        return newly


def parse_networks(text: str) -> list[Network]:
    """``SENDER_TRUSTED_PROXIES``: comma-separated addresses or CIDR networks."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


def client_address(scope: Scope, trusted: list[Network]) -> str:
    """Who is calling: the peer, or behind trusted proxies the address they say they forward for."""
    peer = scope.get("client")
    address = peer[0] if peer else "unknown"
    if not trusted or not _within(address, trusted):
        return address
    forwarded: list[str] = []
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            forwarded += [part.strip() for part in value.decode("latin-1").split(",") if part.strip()]
    for hop in reversed(forwarded):
        if not _within(hop, trusted):
            return hop
    return forwarded[0] if forwarded else address


def _within(address: str, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, secret = value.decode("latin-1").partition(" ")
            return secret.strip() if scheme.lower() == "bearer" and secret.strip() else None
    return None


class AuthThrottle:
    """ASGI middleware: counts the 401s each client gets and refuses a client that gets too many."""

    def __init__(self, app: ASGIApp, table: FailureTable, trusted_proxies: list[Network]) -> None:
        self.app = app
        self.table = table
        self.trusted = trusted_proxies
        self.known: Callable[[str], bool] = lambda secret: False
        """Whether a secret is a known token in the cache (set once the services are up)."""
        self.on_refused: Callable[[], None] = lambda: None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.table.limit <= 0 or _is_health(scope["path"]):
            await self.app(scope, receive, send)
            return
        client = client_address(scope, self.trusted)
        now = time.monotonic()
        left = self.table.blocked_for(client, now)
        if left > 0:
            secret = _bearer(scope)
            if secret is None or not self.known(secret):
                self.on_refused()
                refusal = ApiError(errors.TOO_MANY_AUTH_FAILURES, retry_after=max(1, math.ceil(left)))
                await refusal.response()(scope, receive, send)
                return

        async def watch(message: Message) -> None:
            start = message["type"] == "http.response.start"
            if start and message["status"] == 401 and self.table.failed(client, time.monotonic()):
                log.warning(
                    "client %s refused for %g s after %d failed authentications",
                    client,
                    self.table.block,
                    self.table.limit,
                )
            await send(message)

        await self.app(scope, receive, watch)


def _is_health(path: str) -> bool:
    """Probes are never refused: a throttled load balancer must not take the sender out of service."""
    return path == "/health" or path.startswith("/health/")
