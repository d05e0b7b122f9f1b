"""Configuration of the sender, read from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from contract import DEFAULT_MAX_PRIORITY, DEFAULT_RABBITMQ_URL, servable_model_name
from contract.service_settings import SharedSettings


class SenderSettings(SharedSettings):
    """Every knob of the sender. Names are the environment variables, prefixed ``SENDER_``
    except for the two URLs shared with other services."""

    model_config = SettingsConfigDict(env_prefix="SENDER_", extra="ignore")

    rabbitmq_url: str = Field(
        DEFAULT_RABBITMQ_URL,
        validation_alias=AliasChoices("RABBITMQ_URL", "SENDER_RABBITMQ_URL"),
    )
    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        validation_alias=AliasChoices("DATABASE_URL", "SENDER_DATABASE_URL"),
    )
    host: str = "127.0.0.1"
    port: int = 8080
    metrics_host: str = "127.0.0.1"
    """Where ``GET /metrics`` is served: a port of its own, never the API's (0.0.0.0 in a pod)."""
    metrics_port: int = 9100
    """The metrics port; 0 turns it off. Metrics carry token names: keep it off the ingress."""
    log_level: str = "info"

    max_body_bytes: int = 15 * 1024 * 1024
    """Larger request bodies are refused with 413. With the request's headers it must fit the broker's
    ``max_message_size`` (``SENDER_BROKER_MAX_MESSAGE_SIZE``, 16 MiB by default): checked at start."""
    max_buffered_reply_bytes: int = Field(64 * 1024 * 1024, ge=1)
    """Most reply bytes held for one request: the pieces of a stream waiting for a client that reads
    slowly (or not at all), or a non-streamed answer being put back together. Past it the request is
    stopped and its generation cancelled: a stream ends with a ``client_too_slow`` event, a whole
    answer is 502 ``answer_too_large``."""
    body_timeout_seconds: float = 30.0
    """Time allowed to receive a request's whole body; a client that trickles or stalls past it
    gets 408, so that it does not hold a connection and a coroutine forever."""
    max_header_bytes: int = 64 * 1024
    """Requests whose headers add up to more get 431."""
    max_priority: int = DEFAULT_MAX_PRIORITY
    """Top of the user priority scale; it must match the consumers' ``CONSUMER_MAX_PRIORITY``
    (the queue's ``x-max-priority`` is the wire top derived from it, ``contract.wire_max_priority``)."""
    fair_share: bool = True
    """Within one priority level, publish a token's request lower the more of its requests already
    wait (fair-share sub-levels, ``contract.demotion_for_backlog``); off: first come, first served."""
    deadline_seconds: float = 600.0
    """How long a request may wait and run in all before the client gets 504; a request may
    shorten its own with ``X-Request-Timeout`` (seconds), never lengthen it."""
    max_queued_per_model: int = 10_000
    """Requests waiting in one model's queue beyond which every token gets 503 ``overloaded``."""
    broker_reconnect_seconds: float = 1.0
    """Pause between attempts to reconnect to RabbitMQ."""
    broker_wait: float = Field(10.0, ge=0)
    """While the broker is away (a node restarting, a reconnect, publishes not confirmed), hold a new
    request this many seconds at most (never past its deadline) for the broker to come back, instead
    of answering 503 at once; 0 answers at once."""
    broker_wait_max: int = Field(1000, ge=0)
    """Requests held at once that way; more get 503 ``broker_unavailable`` at once."""
    liveness_seconds: float = 1.0
    """How often the consumers serving streamed answers are checked to be still connected."""
    settle_seconds: float = Field(10.0, ge=0)
    """How long a request whose client left (or whose deadline passed) waits for its consumer's report
    of the tokens it generated before its usage row is written with what is known (0: not at all)."""
    token_cache_seconds: float = 5.0
    """How long a token lookup is trusted; a revoked token works at most this long."""
    unknown_token_cache_seconds: float = 1.0
    token_cache_size: int = 10_000
    """Known tokens cached (LRU)."""
    unknown_token_cache_size: int = 10_000
    """Unknown secrets remembered, apart from the known tokens: spraying random keys evicts none."""
    token_pepper: SecretStr | None = None
    """Server-side secret keying the token hashes (HMAC-SHA-256); strongly recommended. Without one,
    hashes are plain SHA-256, enough only for long random secrets such as the admin CLI makes."""
    token_pepper_file: Path | None = None
    """A file holding the pepper instead (a mounted Kubernetes Secret); surrounding whitespace is ignored."""
    token_legacy_hashes: bool = True
    """With a pepper, still accept rows hashed with plain SHA-256 (made before it), and upgrade them."""
    auth_failure_limit: int = 20
    """401s from one client within ``auth_failure_window_seconds`` after which it gets 429
    ``too_many_auth_failures`` for ``auth_block_seconds``; 0 turns this off."""
    auth_failure_window_seconds: float = 60.0
    auth_block_seconds: float = 60.0
    auth_failure_clients: int = 10_000
    """Clients whose failures are remembered (LRU): the table stays bounded."""
    trusted_proxies: str = ""
    """Comma-separated addresses or networks (CIDR) of proxies whose ``X-Forwarded-For`` names the
    client; by default (none) the client is the connection's peer, whatever the headers say."""
    token_stale_seconds: float = 3600.0
    """While the token database is unreachable, tokens looked up within this time keep working."""
    db_timeout_seconds: float = 2.0
    """A token lookup or rate-limit query slower than this counts as a database failure."""
    usage_accounting: bool = True
    """Write a usage row per request (``usage_records``)."""
    usage_flush_seconds: float = 1.0
    """How often buffered usage rows are written (also on shutdown)."""
    usage_buffer_rows: int = 100_000
    """Usage rows kept while the database is unreachable; the oldest are dropped beyond this."""
    rate_sync_seconds: float = 1.0
    """How often this sender adds its settled tokens to the shared per-minute totals, and how long a
    token whose minute was full waits before asking the database again."""
    queue_stats_seconds: float = 0.25
    """How old the queue depth used for admission may be."""
    queue_without_consumers: bool = False
    """Also queue requests for a model not in ``models`` that has a queue but no live consumer,
    instead of answering 503 (the models in ``models`` always wait for their first replica)."""
    models: str = ""
    """Comma-separated names of the models this deployment serves (the chart's ``models`` list).
    Their queues are declared at start and after each reconnect, before any consumer ever ran, and
    a request for one of them waits while it has no live consumer (it sleeps: the queued request
    is what wakes it up). ``/v1/models`` lists them, sleeping or not, with their ``status``.
    Models not named here are served only while their queue exists, as before."""
    cold_start_seconds: float = Field(0.0, ge=0)
    """How long a request for a configured model with no live consumer waits for one to take it;
    past it, 503 ``model_unavailable`` with ``Retry-After``, and the queued request is cancelled.
    0: up to the request's own deadline (``deadline_seconds``, ``X-Request-Timeout``)."""
    threshold_scope: Literal["token", "queue"] = "token"
    """What a token's ``threshold`` is compared with: ``token`` (default, fair) its own requests
    waiting for the model, as this sender counts them; ``queue`` the whole model queue's depth, so
    that one heavy token's backlog is charged to every token."""
    retry_after_seconds: int = 1
    """``Retry-After`` sent with 503, and the least sent with 429."""
    retry_after_max_seconds: int = 60
    """The most ``Retry-After`` a 429 says: otherwise it is the expected wait (the backlog ahead
    over its recent service rate)."""
    rollcall_wait_seconds: float = 0.5
    """At start, how long to wait for consumers to answer the roll call before serving."""
    shutdown_grace: int = 30
    """On SIGTERM, stop accepting connections and let the requests in flight, long streams
    included, finish for at most this many seconds; streams still open then end with an error event."""
    db_pool_size: int = 5
    metrics_token_label: bool = True
    """Label request metrics with the token name (names are operator-chosen; turn off for many tokens)."""

    @field_validator("models")
    @classmethod
    def _servable_models(cls, models: str) -> str:
        """A name no queue can have is refused at start, not at the first request."""
        bad = [
            name.strip()
            for name in models.split(",")
            if name.strip() and not servable_model_name(name.strip())
        ]
        if bad:
            raise ValueError(f"{bad[0]!r} cannot name a model queue")
        return models

    def configured_models(self) -> tuple[str, ...]:
        """The models of ``SENDER_MODELS``, in order, each once."""
        names = dict.fromkeys(name.strip() for name in self.models.split(","))
        names.pop("", None)
        return tuple(names)

    @model_validator(mode="after")
    def _body_fits_the_broker(self) -> Self:
        self.check_fits_broker(self.max_body_bytes, "max_body_bytes", "SENDER_")
        if self.max_buffered_reply_bytes < self.broker_max_message_size:
            raise ValueError(
                f"SENDER_MAX_BUFFERED_REPLY_BYTES ({self.max_buffered_reply_bytes}) is below "
                f"SENDER_BROKER_MAX_MESSAGE_SIZE ({self.broker_max_message_size}): one reply piece "
                "could then outgrow it on its own"
            )
        return self

    def pepper(self) -> bytes | None:
        """The token pepper as bytes (UTF-8), from ``SENDER_TOKEN_PEPPER`` or the file; None if neither."""
        if self.token_pepper is not None and self.token_pepper_file is not None:
            raise ValueError("set SENDER_TOKEN_PEPPER or SENDER_TOKEN_PEPPER_FILE, not both")
        if self.token_pepper_file is not None:
            text = self.token_pepper_file.read_text().strip()
            if not text:
                raise ValueError(f"the pepper file {self.token_pepper_file} is empty")
            return text.encode()
        if self.token_pepper is not None and self.token_pepper.get_secret_value():
            return self.token_pepper.get_secret_value().encode()
        return None
