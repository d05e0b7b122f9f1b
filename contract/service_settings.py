"""Settings both services read the same way: the broker nodes, TLS to them, their message size, the
queue type, the extra relayed routes.

Each service's settings class inherits these and gives them its own prefix
(``SENDER_``, ``CONSUMER_``), so both sides accept the same values the same way.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract import broker_connection, routes
from contract.broker_tls import broker_ssl_context
from contract.names import DEFAULT_BROKER_MAX_MESSAGE_SIZE, DEFAULT_RABBITMQ_URL, MESSAGE_ENVELOPE_BYTES
from contract.queues import QueueTypeSetting


class SharedSettings(BaseSettings):
    model_config = SettingsConfigDict(hide_input_in_errors=True)
    """A refused value is never echoed: ``RABBITMQ_URL`` and the database URL carry passwords."""

    rabbitmq_url: str = DEFAULT_RABBITMQ_URL
    """Overridden by each service with its ``RABBITMQ_URL`` alias: one node's URL, or several
    separated by commas (the nodes of one cluster); see :mod:`contract.broker_connection`."""
    rabbitmq_ca_file: Path | None = None
    """CA (PEM) that signed the broker's certificate, for an ``amqps://`` URL; unset: the system's CAs."""
    rabbitmq_cert_file: Path | None = None
    """Client certificate (PEM) presented to the broker, with ``rabbitmq_key_file``; unset: none."""
    rabbitmq_key_file: Path | None = None
    broker_max_message_size: int = Field(DEFAULT_BROKER_MAX_MESSAGE_SIZE, gt=MESSAGE_ENVELOPE_BYTES)
    """The broker's ``max_message_size`` (``rabbitmq/rabbitmq.conf``). AMQP does not tell a client,
    and a larger message makes the broker close the channel it came on (every publish in flight on
    it fails), so each service is told, and refuses to start if what it publishes could exceed it."""
    queue_type: QueueTypeSetting = "auto"
    """Type of the durable queues this process declares (:mod:`contract.queues`): ``auto`` picks
    quorum queues on RabbitMQ 4.3 and later (strict priorities, replicated), classic before."""
    extra_routes: str = ""
    """Routes relayed besides :data:`contract.routes.RELAYED_ROUTES`: comma-separated exact paths
    (``/v1/foo,/bar``), each a POST of a JSON body naming a ``model``. Senders and consumers must list
    the same; routes that control the backend are refused."""

    @field_validator("rabbitmq_url")
    @classmethod
    def _check_rabbitmq_url(cls, value: str) -> str:
        broker_connection.parse_urls(value)
        return value

    @property
    def rabbitmq_urls(self) -> list[str]:
        """The broker nodes, in the order they are tried."""
        return broker_connection.parse_urls(self.rabbitmq_url)

    @field_validator("extra_routes")
    @classmethod
    def _check_extra_routes(cls, value: str) -> str:
        routes.parse_extra_routes(value)
        return value

    @property
    def relayed_routes(self) -> frozenset[str]:
        """Every route relayed (sender) or called on the backend (consumer), exact paths."""
        return routes.relayed_routes(routes.parse_extra_routes(self.extra_routes))

    def check_fits_broker(self, body_bytes: int, body_setting: str, prefix: str) -> None:
        """Raise ``ValueError`` (a clear start-up error) if a message of ``body_bytes``, plus its
        headers, could exceed the broker's ``max_message_size``."""
        if body_bytes + MESSAGE_ENVELOPE_BYTES > self.broker_max_message_size:
            raise ValueError(
                f"{prefix}{body_setting.upper()} ({body_bytes} bytes) plus {MESSAGE_ENVELOPE_BYTES} bytes "
                f"kept for message headers exceeds {prefix}BROKER_MAX_MESSAGE_SIZE "
                f"({self.broker_max_message_size} bytes), the broker's max_message_size: the broker "
                f"would refuse such a message and close the channel it came on. Lower {prefix}"
                f"{body_setting.upper()}, or raise max_message_size on the broker and "
                f"{prefix}BROKER_MAX_MESSAGE_SIZE together."
            )

    def rabbitmq_ssl_context(self) -> ssl.SSLContext | None:
        return broker_ssl_context(
            self.rabbitmq_urls[0],
            ca_file=self.rabbitmq_ca_file,
            cert_file=self.rabbitmq_cert_file,
            key_file=self.rabbitmq_key_file,
        )
