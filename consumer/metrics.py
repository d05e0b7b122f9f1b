"""The consumer's Prometheus metrics, in a registry of its own.

Gauges read the worker's live values when scraped (:meth:`ConsumerMetrics.watch`),
so that serving a request costs no gauge update; counters and histograms are
updated once per request, when it is settled. ``consumer/status_server.py``
serves them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.lost_replies = Counter(
            "consumer_lost_replies",
            "Answers stopped because a reply piece did not reach the sender, by reason: "
            "no_reply_queue (returned: the sender is gone), nacked, broker_gone.",
            ["model", "reason"],
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
