"""The consumer's own small HTTP server (``CONSUMER_STATUS_PORT``): ``/metrics``, ``/health`` and
``/backend-metrics``.

Readiness follows the backend: a consumer is ready while it is consuming,
which it does only while its vLLM is healthy. vLLM listens on the pod's
loopback only, so its own ``/metrics`` reaches Prometheus here, as
``/backend-metrics``: relayed unchanged, bounded in size and time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.metrics import ConsumerMetrics

log = logging.getLogger(__name__)

BackendMetrics = Callable[[], Awaitable[tuple[int, bytes, str]]]
"""Reads the backend's ``/metrics``: status, body, content type."""


async def serve_status(
    metrics: ConsumerMetrics,
    ready: Callable[[], bool],
    host: str,
    port: int,
    backend_metrics: BackendMetrics | None = None,
) -> web.AppRunner:
    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def get_health(_: web.Request) -> web.Response:
        return web.json_response({"ready": ready()}, status=200 if ready() else 503)

    async def get_backend_metrics(_: web.Request) -> web.Response:
        assert backend_metrics is not None
        try:
            status, body, content_type = await backend_metrics()
        except TimeoutError:
            return web.Response(status=504, text="the backend's /metrics did not answer in time\n")
        except Exception as exc:  # refused, too large, broken: Prometheus records a failed scrape
            log.debug("backend /metrics failed: %s", exc)
            return web.Response(status=502, text=f"the backend's /metrics failed: {type(exc).__name__}\n")
        if status != 200:
            return web.Response(status=502, text=f"the backend's /metrics answered {status}\n")
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/health", get_health)
    if backend_metrics is not None:
        app.router.add_get("/backend-metrics", get_backend_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
