"""Configuration of a consumer, read from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from contract import DEAD_LETTER_QUEUE, DEFAULT_MAX_PRIORITY, DEFAULT_RABBITMQ_URL
from contract.service_settings import SharedSettings


class ConsumerSettings(SharedSettings):
    """Names are the environment variables, prefixed ``CONSUMER_`` except the three shared ones."""

    model_config = SettingsConfigDict(env_prefix="CONSUMER_", extra="ignore")

    model: str = Field(validation_alias=AliasChoices("MODEL", "CONSUMER_MODEL"))
    """The primary model name clients use (vLLM's first ``--served-model-name``). The backend's other
    names (aliases, LoRA adapters, as its ``/v1/models`` lists them) are served too: ``discover_names``."""
    discover_names: bool = True
    """Serve every name the backend lists besides ``MODEL``, each through its own queue, sharing one flow
    window; false: only ``MODEL``. Names are discovered only from a backend that lists ``MODEL``."""
    names_interval: float = Field(10.0, gt=0)
    """Seconds between two readings of the backend's ``/v1/models``, to follow adapters loaded or
    unloaded at run time."""
    names_balance_interval: float = Field(0.5, gt=0)
    """With several names served: seconds between two readings of their queues' depths, by which the
    flow window's slots move to the names whose requests wait (a request for a name holding no slot
    waits up to this long, plus a slot's release)."""
    vllm_url: str = Field(
        "http://127.0.0.1:8000", validation_alias=AliasChoices("VLLM_URL", "CONSUMER_VLLM_URL")
    )
    vllm_api_key: SecretStr | None = None
    """vLLM's ``--api-key``, sent as ``Authorization: Bearer`` on every backend call; never logged."""
    vllm_api_key_file: Path | None = None
    """A file holding that key (a mounted Secret), instead of ``CONSUMER_VLLM_API_KEY``."""
    backend_metrics_max_bytes: int = Field(8 * 1024 * 1024, ge=1)
    """Largest backend ``/metrics`` relayed on ``/backend-metrics`` of the status port."""
    backend_metrics_timeout: float = Field(5.0, gt=0)
    """Longest wait for the backend's ``/metrics`` when relaying it."""
    rabbitmq_url: str = Field(
        DEFAULT_RABBITMQ_URL,
        validation_alias=AliasChoices("RABBITMQ_URL", "CONSUMER_RABBITMQ_URL"),
    )
    log_level: str = "info"

    max_inflight: int = Field(128, ge=1)
    """Hard cap on requests taken from the queue and not yet answered."""
    flow: Literal["auto", "metrics", "fixed"] = "auto"
    """``metrics``: take requests only while the backend's waiting queue stays near zero.
    ``fixed``: always take up to ``max_inflight``. ``auto``: ``metrics`` when the backend exports them."""
    initial_window: int = Field(8, ge=1)
    waiting_tolerance: float = 0.0
    """Backend waiting requests tolerated before the consumer stops taking more."""
    kv_cache_max: float = 0.95
    """KV cache usage (0-1) above which the consumer stops taking more."""
    metrics_interval: float = 0.1
    health_interval: float = 2.0
    health_timeout: float = 5.0
    """A ``/health`` answer slower than this counts as slow."""
    health_slow_checks: int = Field(3, ge=1)
    """Slow health answers in a row that pause consumption. A refused or failed check pauses at once;
    a slow one may just be a busy server (vLLM's API server answers late under heavy load)."""
    announce_interval: float = 5.0
    startup_timeout: float = 0.0
    """Seconds to wait for the backend at start; 0 waits forever (big models load slowly)."""
    shutdown_grace: float = 30.0
    """On SIGTERM, how long requests in flight may take to finish."""

    status_host: str = "0.0.0.0"
    status_port: int = 9400
    """Port of the consumer's ``/metrics`` and ``/health`` (readiness follows the backend); 0 turns it off."""

    forward_priority: bool = False
    """Set the body's ``priority`` for vLLM's ``--scheduling-policy priority`` (lower = sooner)."""
    max_priority: int = DEFAULT_MAX_PRIORITY
    """Top of the user priority scale, as the senders' ``SENDER_MAX_PRIORITY``; the queue's
    ``x-max-priority`` is the wire top derived from it (``contract.wire_max_priority``)."""
    flush_interval: float = 0.05
    """Streamed answers are sent at most this often (the first token at once), to spare the broker."""
    flush_interval_max: float = 0.2
    """The interval doubles after each timed piece of a stream, up to this: a long answer costs
    a few pieces a second (each piece costs CPU in both processes), a short one stays smooth."""
    flush_rate: float = Field(320.0, gt=0)
    """Timed pieces per second the consumer aims at across all its streams. With more streams under way
    than ``flush_rate`` times ``flush_interval`` (16), each starts at a longer interval (streams divided
    by this rate, up to ``flush_interval_max``): a busy consumer spends its CPU (and the sender's) on
    answers rather than on pieces. The first token never waits."""
    flush_bytes: int = Field(64 * 1024, ge=1)
    """... or when this much piled up; also the largest body of one reply piece: a larger answer,
    streamed or not, travels as several pieces. Must fit ``CONSUMER_BROKER_MAX_MESSAGE_SIZE``."""
    dead_letter_queue: str = DEAD_LETTER_QUEUE
    """Durable queue where unreadable request messages are kept for inspection."""
    cancel_catch_up_seconds: float = Field(10.0, gt=0)
    """At start, longest time spent reading the cancellations published before (the cancellation
    stream); past it the consumer serves anyway, and a request cancelled meanwhile may be served."""
    reconnect_interval: float = 1.0
    """Seconds between attempts to reconnect to the broker after losing it."""

    @model_validator(mode="after")
    def _pieces_fit_the_broker(self) -> Self:
        self.check_fits_broker(self.flush_bytes, "flush_bytes", "CONSUMER_")
        return self

    @model_validator(mode="after")
    def _one_api_key(self) -> Self:
        if self.vllm_api_key is not None and self.vllm_api_key_file is not None:
            raise ValueError("set CONSUMER_VLLM_API_KEY or CONSUMER_VLLM_API_KEY_FILE, not both")
        return self

    def backend_api_key(self) -> str | None:
        """The vLLM API key, from the file if one is named (read at each call: a rotated Secret is
        picked up on restart); None: no key."""
        if self.vllm_api_key_file is not None:
            key = self.vllm_api_key_file.read_text().strip()
            if not key:
                raise ValueError(f"{self.vllm_api_key_file} is empty")
            return key
        return self.vllm_api_key.get_secret_value() if self.vllm_api_key is not None else None
