"""The consumer's own small HTTP server: Prometheus metrics and a readiness probe.

Readiness follows the backend: a consumer is ready while it is consuming,
which it does only while its vLLM is healthy.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ConsumerMetrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "consumer_requests",
            "Requests taken from the queue, by backend status and outcome "
            "(answered, cancelled, skipped, requeued, failed).",
            ["model", "status", "outcome"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "consumer_queue_wait_seconds",
            "Time requests waited in RabbitMQ, from publish to delivery.",
            ["model", "priority"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.serve_time = Histogram(
            "consumer_serve_duration_seconds",
            "Time from delivery to the end of the answer.",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "consumer_prompt_tokens",
            "Prompt tokens of answered requests, as the backend reports them.",
            ["model"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "consumer_completion_tokens",
            "Generated tokens of answered requests, as the backend reports them "
            "(for streams, only when the client asked for usage).",
            ["model"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "consumer_requests_in_flight",
            "Requests taken and not yet answered.",
            ["model"],
            registry=self.registry,
        )
        self.window = Gauge(
            "consumer_flow_window",
            "Requests the consumer may hold at once.",
            ["model"],
            registry=self.registry,
        )
        self.backend_healthy = Gauge(
            "consumer_backend_healthy",
            "1 while the backend answers its health check.",
            ["model"],
            registry=self.registry,
        )
        self.consuming = Gauge(
            "consumer_consuming", "1 while the consumer takes requests.", ["model"], registry=self.registry
        )

    def watch(
        self,
        *,
        in_flight: Callable[[], float],
        window: Callable[[], float],
        healthy: Callable[[], float],
        consuming: Callable[[], float],
    ) -> None:
        """Read the live values at scrape time rather than updating gauges on every request."""
        self.in_flight.labels(self.model).set_function(in_flight)
        self.window.labels(self.model).set_function(window)
        self.backend_healthy.labels(self.model).set_function(healthy)
        self.consuming.labels(self.model).set_function(consuming)


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
