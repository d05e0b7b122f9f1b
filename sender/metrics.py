"""Prometheus metrics of the sender, served at ``GET /metrics``.

Label values are bounded: a model is labelled by its name only once its
queue was seen to exist (queues are declared by consumers, never by clients);
any other name a client sends is labelled ``_unknown``. Token names are chosen
by operators (``SENDER_METRICS_TOKEN_LABEL=false`` drops them), statuses and
priorities are small sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sender.queue_stats import QueueStats

UNKNOWN_MODEL = "_unknown"
"""The ``model`` label of requests for a model that has no queue (whatever name the client sent)."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class SenderMetrics:
    def __init__(self, *, token_label: bool) -> None:
        self.registry = CollectorRegistry()
        self._token_label = token_label
        self._models: set[str] = set()
        """Models whose queue was seen to exist: the only names used as labels."""
        self.requests = Counter(
            "dispatcher_requests",
            "Requests answered by the sender, by model, token name, status and priority.",
            ["model", "token", "status", "priority"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "dispatcher_rejected_requests",
            "Requests the sender refused itself, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "dispatcher_request_duration_seconds",
            "Time from the request's arrival to the end of its answer.",
            ["model", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "dispatcher_time_to_first_byte_seconds",
            "Time from the request's arrival to the first piece of its answer (queue wait included).",
            ["model", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "dispatcher_requests_in_flight",
            "Requests waiting for or receiving an answer.",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "dispatcher_queue_depth",
            "Requests waiting in the model's queue, as last read by this sender.",
            ["model"],
            registry=self.registry,
        )
        self.queue_consumers = Gauge(
            "dispatcher_queue_consumers",
            "Consumers attached to the model's queue, as last read by this sender.",
            ["model"],
            registry=self.registry,
        )
        self.broker_reconnects = Counter(
            "dispatcher_broker_reconnects",
            "Times a connection to RabbitMQ (the publishing or the consuming one) was re-established.",
            registry=self.registry,
        )
        self.token_queries = Counter(
            "dispatcher_token_queries",
            "Token lookups that went to the database (the rest came from the cache).",
            registry=self.registry,
        )
        self.usage_rows_written = Counter(
            "dispatcher_usage_rows_written",
            "Usage rows written to the database.",
            registry=self.registry,
        )
        self.usage_rows_dropped = Counter(
            "dispatcher_usage_rows_dropped",
            "Usage rows dropped because the buffer was full while the database was unreachable.",
            registry=self.registry,
        )
        self.broker_connected = Gauge(
            "dispatcher_broker_connected",
            "1 while the sender is connected to RabbitMQ.",
            registry=self.registry,
        )
        self.buffered_reply_bytes = Gauge(
            "dispatcher_buffered_reply_bytes",
            "Reply bytes held for clients: stream pieces not yet read, non-streamed answers being put "
            "back together (each request at most SENDER_MAX_BUFFERED_REPLY_BYTES).",
            registry=self.registry,
        )
        self.stopped_answers = Counter(
            "dispatcher_stopped_answers",
            "Requests stopped (and their generation cancelled) because their answer outgrew "
            "SENDER_MAX_BUFFERED_REPLY_BYTES: a client too slow to read, or a whole answer too large.",
            registry=self.registry,
        )
        self.broker_held = Gauge(
            "dispatcher_broker_held_requests",
            "Requests held right now for the broker to come back (SENDER_BROKER_WAIT).",
            registry=self.registry,
        )

    def model_label(self, model: str) -> str:
        """``model`` if its queue exists (or existed), else ``_unknown``: clients choose the name."""
        return model if model in self._models else UNKNOWN_MODEL

    def answered(self, model: str, token: str, status: int, priority: int, seconds: float) -> None:
        label = self.model_label(model)
        self.requests.labels(label, token if self._token_label else "", str(status), str(priority)).inc()
        self.duration.labels(label, str(priority)).observe(seconds)

    def queue_read(self, model: str, stats: QueueStats) -> None:
        """Numbers of a queue that exists (only those are read out)."""
        self._models.add(model)
        self.queue_depth.labels(model).set(stats.messages)
        self.queue_consumers.labels(model).set(stats.consumers)

    def first_piece(self, model: str, priority: int, seconds: float) -> None:
        self.first_byte.labels(self.model_label(model), str(priority)).observe(seconds)
