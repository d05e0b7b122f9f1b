"""rabbitmq/definitions.json, imported into a scratch virtual host of the real test broker, applies
its policy to a model queue declared as the consumers declare it, and dead-letters what expires."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import aio_pika
import pytest

import contract
from harness.testrun import RABBITMQ_URL, unique

DEFINITIONS = Path(__file__).resolve().parents[2] / "rabbitmq" / "definitions.json"

# Applied to a scratch virtual host of the test broker, which must answer.
pytestmark = pytest.mark.usefixtures("rabbitmq")


def rabbitmqctl(*args: str) -> str:
    if not shutil.which("rabbitmqctl"):
        pytest.fail("this test needs rabbitmqctl of the local RabbitMQ (policies cannot be set over AMQP)")
    result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def vhost() -> Iterator[str]:
    name = unique("dispatch-definitions")
    rabbitmqctl("add_vhost", name)
    try:
        user = urllib.parse.urlsplit(RABBITMQ_URL).username or "guest"
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        definitions = json.loads(DEFINITIONS.read_text())
        for kind in ("policies", "exchanges", "queues", "bindings"):
            for entry in definitions[kind]:
                assert entry["vhost"] == "/"
                entry["vhost"] = name
        # Readable by all: rabbitmqctl may run as the broker's user.
        with tempfile.TemporaryDirectory() as scratch:
            os.chmod(scratch, 0o755)
            path = Path(scratch) / "definitions.json"
            path.write_text(json.dumps(definitions))
            path.chmod(0o644)
            rabbitmqctl("import_definitions", str(path))
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def vhost_url(vhost: str) -> str:
    parts = urllib.parse.urlsplit(RABBITMQ_URL)
    return parts._replace(path="/" + urllib.parse.quote(vhost, safe="")).geturl()


async def test_model_queue_gets_the_policy_and_dead_letters(vhost: str) -> None:
    model_queue = contract.model_queue("some-model")
    connection = await aio_pika.connect(vhost_url(vhost))
    async with connection:
        channel = await connection.channel()
        # The import is asynchronous: wait for the dead-letter queue it declares.
        async with asyncio.timeout(30):
            while True:
                try:
                    dead = await channel.declare_queue("dispatch.dead-letter", passive=True)
                    break
                except aio_pika.exceptions.ChannelClosed:
                    channel = await connection.channel()
                    await asyncio.sleep(0.2)
        # The control exchange as the services declare it: equivalent to the imported one.
        await channel.declare_exchange(contract.CONTROL_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(
            model_queue, durable=True, arguments=contract.model_queue_arguments(contract.QueueType.CLASSIC)
        )
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"prompt": "too late"}', priority=5, expiration=0.001), routing_key=queue.name
        )
        async with asyncio.timeout(30):
            while True:
                message = await dead.get(fail=False)
                if message is not None:
                    break
                await asyncio.sleep(0.05)
        assert message.body == b'{"prompt": "too late"}'
        (death,) = cast("list[dict[str, Any]]", message.headers["x-death"])
        assert death["reason"] == "expired" and death["queue"] == model_queue

    queues = rabbitmqctl("list_queues", "-p", vhost, "name", "policy").splitlines()
    applied_to = dict(line.split("\t")[:2] for line in queues)
    assert applied_to[model_queue] == "dispatch-model-queues"
    assert applied_to["dispatch.dead-letter"] == "dispatch-dead-letter"
    policies = {
        row[1]: json.loads(row[4])
        for row in (line.split("\t") for line in rabbitmqctl("list_policies", "-p", vhost).splitlines())
        if len(row) > 4 and row[0] == vhost
    }
    limits = policies["dispatch-model-queues"]
    assert limits["max-length"] == 100000 and limits["overflow"] == "reject-publish"
    assert limits["dead-letter-exchange"] == "dispatch.dead"
