"""Configuration of the sender, read from the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from contract import DEFAULT_MAX_PRIORITY, DEFAULT_RABBITMQ_URL
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

    max_body_bytes: int = 16 * 1024 * 1024
    """Larger request bodies are refused with 413."""
    body_timeout_seconds: float = 30.0
    """Time allowed to receive a request's whole body; a client that trickles or stalls past it
    gets 408, so that it does not hold a connection and a coroutine forever."""
    max_header_bytes: int = 64 * 1024
    """Requests whose headers add up to more get 431."""
    max_priority: int = DEFAULT_MAX_PRIORITY
    """Top of the priority scale; it must match the consumers' ``x-max-priority``."""
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
    """How old the tokens-per-minute total may be, and how often this sender adds its own to it."""
    queue_stats_seconds: float = 0.25
    """How old the queue depth used for admission may be."""
    queue_without_consumers: bool = False
    """Queue requests for a model that has a queue but no live consumer, instead of answering 503:
    with a model scaled to zero (KEDA), the queued request is what wakes it up, and it waits for
    the first replica up to its deadline."""
    retry_after_seconds: int = 1
    """``Retry-After`` sent with 429 and 503."""
    rollcall_wait_seconds: float = 0.5
    """At start, how long to wait for consumers to answer the roll call before serving."""
    shutdown_grace: int = 30
    """On SIGTERM, stop accepting connections and let the requests in flight, long streams
    included, finish for at most this many seconds; streams still open then end with an error event."""
    db_pool_size: int = 5
    metrics_token_label: bool = True
    """Label request metrics with the token name (names are operator-chosen; turn off for many tokens)."""

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
