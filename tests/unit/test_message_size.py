"""What the services publish fits the broker's ``max_message_size``, or they refuse to start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from consumer.settings import ConsumerSettings
from contract import DEFAULT_BROKER_MAX_MESSAGE_SIZE, MESSAGE_ENVELOPE_BYTES
from sender.settings import SenderSettings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_fit_the_shipped_broker_configuration() -> None:
    conf = (ROOT / "rabbitmq" / "rabbitmq.conf").read_text().splitlines()
    assert f"max_message_size = {DEFAULT_BROKER_MAX_MESSAGE_SIZE}" in conf
    sender = SenderSettings()
    assert sender.broker_max_message_size == DEFAULT_BROKER_MAX_MESSAGE_SIZE
    assert sender.max_body_bytes + MESSAGE_ENVELOPE_BYTES <= DEFAULT_BROKER_MAX_MESSAGE_SIZE
    consumer = ConsumerSettings(model="m")
    assert consumer.flush_bytes + MESSAGE_ENVELOPE_BYTES <= consumer.broker_max_message_size


def test_a_body_limit_too_close_to_the_broker_limit_is_refused() -> None:
    with pytest.raises(
        ValidationError, match=r"SENDER_MAX_BODY_BYTES .* exceeds SENDER_BROKER_MAX_MESSAGE_SIZE"
    ):
        SenderSettings(max_body_bytes=DEFAULT_BROKER_MAX_MESSAGE_SIZE)
    # Raised together, it is fine.
    SenderSettings(max_body_bytes=32 * 1024 * 1024, broker_max_message_size=33 * 1024 * 1024)
    with pytest.raises(ValidationError, match="SENDER_MAX_BUFFERED_REPLY_BYTES"):
        SenderSettings(max_buffered_reply_bytes=1024 * 1024)
    with pytest.raises(ValidationError, match="CONSUMER_FLUSH_BYTES"):
        ConsumerSettings(model="m", flush_bytes=1024 * 1024, broker_max_message_size=1024 * 1024)


@pytest.mark.parametrize("service", ["sender", "consumer"])
def test_the_service_says_why_it_does_not_start_and_shows_no_secret(service: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": "postgresql+psycopg://dispatch:hunter2-secret@127.0.0.1:1/x",
        "RABBITMQ_URL": "amqp://dispatch:hunter2-secret@127.0.0.1:1/",
        "MODEL": "m",
        f"{service.upper()}_BROKER_MAX_MESSAGE_SIZE": str(1024 * 1024),
        "CONSUMER_FLUSH_BYTES": str(1024 * 1024),
        "SENDER_MAX_BODY_BYTES": str(1024 * 1024),
    }
    result = subprocess.run(
        [sys.executable, "-m", service], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert f"{service}: invalid configuration" in result.stderr
    assert "BROKER_MAX_MESSAGE_SIZE" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
