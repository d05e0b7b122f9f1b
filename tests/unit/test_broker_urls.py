"""``RABBITMQ_URL`` as a list of nodes: checked at start, never shown with its password, tried in turn."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from contract import broker_connection
from contract.broker_connection import NodeListConnection, parse_urls, redact
from sender.settings import SenderSettings


def test_one_url_or_several() -> None:
    assert parse_urls("amqp://u:p@h:5672/") == ["amqp://u:p@h:5672/"]
    assert parse_urls("amqp://u:p@a:5672/, amqp://u:p@b:5673/vhost") == [
        "amqp://u:p@a:5672/",
        "amqp://u:p@b:5673/vhost",
    ]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "empty"),
        ("amqp://u:hunter2@a/,", "entry 2 of 2 is empty"),
        ("http://u:hunter2@a/", "amqp://"),
        ("amqp://u:hunter2@a:99999/", "entry 1 of 1"),
        ("amqp:///vhost", "no host"),
        ("amqp://u:hunter2@a/,amqps://u:hunter2@b/", "mixes"),
    ],
)
def test_a_bad_entry_is_named_without_its_password(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as refused:
        parse_urls(value)
    assert "hunter2" not in str(refused.value)


def test_settings_refuse_a_bad_list_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:hunter2@a:5672/,amqp://u:hunter2@b:notaport/")
    with pytest.raises(ValidationError) as refused:
        SenderSettings()
    assert "entry 2 of 2" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    monkeypatch.setenv("RABBITMQ_URL", "amqp://u:p@a:5672/,amqp://u:p@b:5673/")
    assert SenderSettings().rabbitmq_urls == ["amqp://u:p@a:5672/", "amqp://u:p@b:5673/"]


def test_redact() -> None:
    assert redact("amqp://user:hunter2@a:5672/v?heartbeat=5") == "amqp://user:***@a:5672/v"
    assert redact("amqp://a/") == "amqp://a/"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_each_failed_attempt_moves_on_to_the_next_node() -> None:
    urls = [f"amqp://u:hunter2@127.0.0.1:{_closed_port()}/" for _ in range(3)]
    connection = NodeListConnection(urls, 1, reconnect_interval=0.01)
    assert connection.url.port == int(urls[1].rsplit(":", 1)[1].strip("/"))
    with pytest.raises(ConnectionError):
        await connection.connect(timeout=5)
    assert str(connection.url) == urls[2]
    assert "hunter2" not in str(connection)
    await connection.close()


async def test_no_node_answers_raises_after_trying_each() -> None:
    urls = [f"amqp://guest:guest@127.0.0.1:{_closed_port()}/" for _ in range(2)]
    with pytest.raises(ConnectionError):
        await broker_connection.connect(urls, name="test", reconnect_interval=0.01, timeout=5)
