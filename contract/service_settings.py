"""Settings both services read the same way: TLS to the broker, the queue type and the extra relayed routes.

Each service's settings class inherits these and gives them its own prefix
(``SENDER_``, ``CONSUMER_``), so both sides accept the same values the same way.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings

from contract import routes
from contract.broker_tls import broker_ssl_context
from contract.names import DEFAULT_RABBITMQ_URL
from contract.queues import QueueTypeSetting


class SharedSettings(BaseSettings):
    rabbitmq_url: str = DEFAULT_RABBITMQ_URL
    """Overridden by each service with its ``RABBITMQ_URL`` alias."""
    rabbitmq_ca_file: Path | None = None
    """CA (PEM) that signed the broker's certificate, for an ``amqps://`` URL; unset: the system's CAs."""
    rabbitmq_cert_file: Path | None = None
    """Client certificate (PEM) presented to the broker, with ``rabbitmq_key_file``; unset: none."""
    rabbitmq_key_file: Path | None = None
    queue_type: QueueTypeSetting = "auto"
    """Type of the durable queues this process declares (:mod:`contract.queues`): ``auto`` picks
    quorum queues on RabbitMQ 4.3 and later (strict priorities, replicated), classic before."""
    extra_routes: str = ""
    """Routes relayed besides :data:`contract.routes.RELAYED_ROUTES`: comma-separated exact paths
    (``/v1/foo,/bar``), each a POST of a JSON body naming a ``model``. Senders and consumers must list
    the same; routes that control the backend are refused."""

    @field_validator("extra_routes")
    @classmethod
    def _check_extra_routes(cls, value: str) -> str:
        routes.parse_extra_routes(value)
        return value

    @property
    def relayed_routes(self) -> frozenset[str]:
        """Every route relayed (sender) or called on the backend (consumer), exact paths."""
        return routes.relayed_routes(routes.parse_extra_routes(self.extra_routes))

    def rabbitmq_ssl_context(self) -> ssl.SSLContext | None:
        return broker_ssl_context(
            self.rabbitmq_url,
            ca_file=self.rabbitmq_ca_file,
            cert_file=self.rabbitmq_cert_file,
            key_file=self.rabbitmq_key_file,
        )
