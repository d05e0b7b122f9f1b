"""The consumer's own small HTTP server (``CONSUMER_STATUS_PORT``): ``/metrics`` and ``/health``.

Readiness follows the backend: a consumer is ready while it is consuming,
which it does only while its vLLM is healthy.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.metrics import ConsumerMetrics


async def serve_status(
    metrics: ConsumerMetrics, ready: Callable[[], bool], host: str, port: int
) -> web.AppRunner:
    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def get_health(_: web.Request) -> web.Response:
        return web.json_response({"ready": ready()}, status=200 if ready() else 503)

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/health", get_health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
