"""The TLS settings of the broker connection: what they accept and refuse (the real handshake is
tested against a private TLS node in tests/security)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.settings import ConsumerSettings
from contract.broker_tls import broker_ssl_context
from sender.settings import SenderSettings


def test_no_file_leaves_tls_to_the_url() -> None:
    assert broker_ssl_context("amqps://u:p@h/", ca_file=None, cert_file=None, key_file=None) is None
    assert broker_ssl_context("amqp://u:p@h/", ca_file=None, cert_file=None, key_file=None) is None


def test_files_need_amqps_and_a_pair(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    with pytest.raises(ValueError, match="amqps://"):
        broker_ssl_context("amqp://u:p@h/", ca_file=ca, cert_file=None, key_file=None)
    with pytest.raises(ValueError, match="needs its key"):
        broker_ssl_context("amqps://u:p@h/", ca_file=None, cert_file=ca, key_file=None)


def test_both_services_read_the_same_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL", "m")
    for prefix, settings in (("SENDER", SenderSettings), ("CONSUMER", ConsumerSettings)):
        monkeypatch.setenv(f"{prefix}_RABBITMQ_CA_FILE", "/etc/ca.crt")
        monkeypatch.setenv(f"{prefix}_RABBITMQ_CERT_FILE", "/etc/tls.crt")
        monkeypatch.setenv(f"{prefix}_RABBITMQ_KEY_FILE", "/etc/tls.key")
        loaded = settings()
        assert (loaded.rabbitmq_ca_file, loaded.rabbitmq_cert_file, loaded.rabbitmq_key_file) == (
            Path("/etc/ca.crt"),
            Path("/etc/tls.crt"),
            Path("/etc/tls.key"),
        )
