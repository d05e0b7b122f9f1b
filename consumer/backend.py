"""The consumer's view of its vLLM server: requests, health, served names and load, over one HTTP pool.

The client is aiohttp rather than httpx: httpx's connection pool checks every
idle connection's socket on each request, which at 64 concurrent requests
cost the consumer about 5 ms of CPU per request (measured with py-spy); with
aiohttp the whole consumer stays well under 1 ms.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

_JSON_HEADERS = {"Content-Type": "application/json"}


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"
    SLOW = "slow"
    """No answer within the timeout: a wedged server, or one too busy to answer at once."""


class BackendUnreachable(Exception):
    """The backend could not be connected to: nothing was sent, the request may go elsewhere."""


class BackendFailed(Exception):
    """The connection to the backend broke while a request was under way."""


class MetricsTooLarge(Exception):
    """The backend's ``/metrics`` exposition is larger than the consumer relays."""


class Backend:
    """``api_key`` (vLLM's ``--api-key``) goes as ``Authorization: Bearer`` on every call: vLLM wants
    it on ``/v1/*`` and ignores it elsewhere, and one session header cannot be forgotten on a new route."""

    def __init__(self, base_url: str, *, max_connections: int, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._origin = URL(self.base_url).origin()
        self._max_connections = max_connections
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    def url(self, path: str) -> URL:
        """The backend's URL of ``path``, taken as it is: never decoded, normalised or joined
        (``path`` is one of the served routes; see :mod:`contract.routes`)."""
        return self._origin.with_path(path, encoded=True)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60),
                headers=self._headers,
                # Reads wait as long as generation takes: each request is bounded by its own deadline.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @asynccontextmanager
    async def post(self, path: str, body: bytes) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST ``body`` to ``path``; connection failures become :class:`BackendUnreachable`,
        later ones :class:`BackendFailed`."""
        try:
            response = await self.session.post(self.url(path), data=body, headers=_JSON_HEADERS)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            # A keep-alive connection the backend closed while restarting looks the same as a refused one.
            raise BackendUnreachable(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise BackendFailed(type(exc).__name__) from exc
        try:
            yield response
        except aiohttp.ClientError as exc:
            raise BackendFailed(type(exc).__name__) from exc
        finally:
            response.release()

    async def health(self, timeout: float) -> Health:
        """``/health`` of the backend: up, down (refused, or not 200), or too slow to tell."""
        try:
            async with self.session.get(
                self.url("/health"), timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                return Health.UP if response.status == 200 else Health.DOWN
        except TimeoutError:
            return Health.SLOW
        except aiohttp.ClientError:
            return Health.DOWN

    async def models(self) -> list[dict[str, Any]]:
        """The backend's ``/v1/models`` entries: every name it serves (aliases, LoRA adapters)."""
        async with self.session.get(
            self.url("/v1/models"), timeout=aiohttp.ClientTimeout(total=5)
        ) as response:
            response.raise_for_status()
            entries = (await response.json()).get("data") or []
        if not isinstance(entries, list):
            raise ValueError("/v1/models: data is not a list")
        return entries

    async def load(self) -> BackendLoad | None:
        try:
            async with self.session.get(
                self.url("/metrics"), timeout=aiohttp.ClientTimeout(total=1)
            ) as response:
                if response.status != 200:
                    return None
                return parse_vllm_metrics(await response.text())
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def metrics_exposition(self, *, max_bytes: int, timeout: float) -> tuple[int, bytes, str]:
        """The backend's ``/metrics`` as it answered (status, body, content type), for Prometheus
        through the consumer's status port; :class:`MetricsTooLarge` past ``max_bytes``."""
        async with self.session.get(
            self.url("/metrics"), timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            body = await response.content.read(max_bytes + 1)
            if len(body) > max_bytes:
                raise MetricsTooLarge(f"more than {max_bytes} bytes")
            return response.status, body, response.headers.get("Content-Type", "text/plain")


# vLLM's gauge names; older releases call the KV cache gauge gpu_cache_usage_perc.
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


@dataclass(frozen=True, slots=True)
class BackendLoad:
    """What vLLM's ``/metrics`` says about its load: the flow window follows it."""

    running: float
    waiting: float
    kv_cache: float | None


def parse_vllm_metrics(text: str) -> BackendLoad | None:
    """Read the gauges that matter from a Prometheus exposition; None if it is not vLLM's."""
    wanted = {RUNNING, WAITING, *KV_CACHE}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i > 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        if name not in wanted:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        totals[name] = totals.get(name, 0.0) + value
    if WAITING not in totals:
        return None
    kv = next((totals[name] for name in KV_CACHE if name in totals), None)
    return BackendLoad(running=totals.get(RUNNING, 0.0), waiting=totals[WAITING], kv_cache=kv)
