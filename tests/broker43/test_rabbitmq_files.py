"""rabbitmq/rabbitmq.conf and rabbitmq/definitions.json on RabbitMQ 4.3, used as compose and the chart do.

A node of its own boots with the configuration the chart renders (rabbitmq.conf's
lines and consumer_timeout), after the cluster operator's own defaults, plus the
test bed's ports and paths and the management plugin that the ``-management``
images and the cluster operator enable; then rabbitmq/definitions.json and rabbitmq/compose-users.json
are posted to ``/api/definitions``, as compose's ``rabbitmq-init`` and the chart's
definitions Job do. The node must boot, carry our settings, hold the users with
their permissions, apply the policies to quorum model queues (and to classic ones,
the path of older brokers) and log no deprecation caused by our configuration.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aio_pika
import pytest

import contract
from contract.names import DEFAULT_BROKER_MAX_MESSAGE_SIZE
from harness import rabbitmq43
from harness.chart_render import of_kind, render
from harness.stack import free_port

# Every test stops by itself; the first one also boots the node (up to about 20 s on a busy machine).
pytestmark = pytest.mark.timeout(240)

RABBITMQ = Path(__file__).resolve().parents[2] / "rabbitmq"
DEPRECATIONS_OF_THE_MANAGEMENT_PLUGIN = {"management_metrics_collection"}
"""Logged by any 4.3 node with the management plugin, whatever its configuration: KEDA's default
trigger (``keda.protocol: http``) reads queue counts from those metrics (rabbitmq/README.md)."""


@dataclass
class Configured:
    node: rabbitmq43.Node43
    api: str


def call(url: str, body: bytes | None = None) -> Any:
    """The management API as guest (allowed from loopback); the answer decoded, None when empty."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    request.add_header("authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as answer:
        text = answer.read()
    return json.loads(text) if text else None


# What the cluster operator itself puts before the chart's lines (its operatorDefaults.conf), less
# the Kubernetes peer discovery: on 4.3 its queue_master_locator must not break the node either.
OPERATOR_DEFAULTS = """
queue_master_locator = min-masters
disk_free_limit.absolute = 2GB
cluster_partition_handling = pause_minority
"""


def broker_config() -> str:
    """The lines the chart gives the RabbitmqCluster (rabbitmq/rabbitmq.conf, consumer_timeout from its
    value), after the operator's defaults; compose's broker reads a subset (the file alone)."""
    (cluster,) = of_kind(render({}), "RabbitmqCluster")
    chart_lines = cast("str", cluster["spec"]["rabbitmq"]["additionalConfig"])
    lines = (RABBITMQ / "rabbitmq.conf").read_text().splitlines()
    assert {line for line in lines if line.strip() and line[0] != "#"} <= set(chart_lines.splitlines())
    return OPERATOR_DEFAULTS + chart_lines


@pytest.fixture(scope="module")
def configured43(testbed43: rabbitmq43.Testbed) -> Iterator[Configured]:
    node = testbed43.node(start=False)
    management = free_port()
    config = node.directory / "rabbitmq.conf"  # the test bed's listener and logs, then the broker's
    config.write_text(
        config.read_text()
        + broker_config()
        + f"\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management}\n"
        + "collect_statistics_interval = 500\n"  # queue counts in the API within a second
    )
    (node.directory / "enabled_plugins").write_text("[rabbitmq_management].\n")
    try:
        node.start()
        node.ctl("await_startup", "--timeout", "90", timeout=120)
        api = f"http://127.0.0.1:{management}/api"
        deadline = time.monotonic() + 60
        while True:  # the management listener comes up after AMQP
            try:
                call(f"{api}/overview")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"no management API on {management}:\n{node.log_tail()}"
                time.sleep(0.5)
        for name in ("definitions.json", "compose-users.json"):
            try:
                call(f"{api}/definitions", (RABBITMQ / name).read_bytes())
            except urllib.error.HTTPError as exc:
                pytest.fail(f"RabbitMQ 4.3 refused rabbitmq/{name}: {exc.code} {exc.read()!r}")
        yield Configured(node, api)
    finally:
        node.stop()


def test_node_runs_with_our_settings(configured43: Configured) -> None:
    keys = ["consumer_timeout", "max_message_size", "vm_memory_high_watermark", "disk_free_limit"]
    answer = configured43.node.ctl(
        "eval", f"[application:get_env(rabbit, K) || K <- [{', '.join(keys)}]]."
    ).strip()
    consumer_timeout, max_message_size, memory, disk = answer.strip("[]").split("},{")
    assert consumer_timeout.strip("{") == "ok,7200000"
    assert max_message_size == f"ok,{DEFAULT_BROKER_MAX_MESSAGE_SIZE}"
    assert "0.6" in memory and "2GB" in disk, answer


def test_users_and_permissions_exist(configured43: Configured) -> None:
    """compose-users.json's users, permissions and topic permissions (the latter need the control
    exchange, which 4.3 checks: definitions.json declares it)."""
    expected = json.loads((RABBITMQ / "compose-users.json").read_text())
    users = {u["name"] for u in call(f"{configured43.api}/users")}
    assert {u["name"] for u in expected["users"]} <= users
    permissions = {p["user"]: p for p in call(f"{configured43.api}/permissions")}
    for wanted in expected["permissions"]:
        held = permissions[wanted["user"]]
        assert [held[k] for k in ("vhost", "configure", "write", "read")] == [
            wanted[k] for k in ("vhost", "configure", "write", "read")
        ]
    topics = {(t["user"], t["exchange"]): t for t in call(f"{configured43.api}/topic-permissions")}
    for wanted in expected["topic_permissions"]:
        held = topics[(wanted["user"], wanted["exchange"])]
        assert (held["vhost"], held["write"], held["read"]) == (
            wanted["vhost"],
            wanted["write"],
            wanted["read"],
        )


async def test_policies_apply_to_quorum_and_classic_model_queues(configured43: Configured) -> None:
    node = configured43.node
    quorum = contract.model_queue("files-quorum")
    classic = contract.model_queue("files-classic")
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()
        # What the services declare: the control exchange (as definitions.json has it), the
        # dead-letter queue, a quorum model queue (4.3: no x-max-priority) and a classic one.
        await channel.declare_exchange(contract.CONTROL_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        dead = await channel.declare_queue(contract.DEAD_LETTER_QUEUE, durable=True)
        queue = await channel.declare_queue(quorum, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.declare_queue(
            classic, durable=True, arguments=contract.model_queue_arguments(contract.QueueType.CLASSIC)
        )
        try:
            rows = {row[0]: row[1:] for row in node.list_queues("name", "type", "policy")}
            assert rows[quorum] == ["quorum", "dispatch-model-queues"]
            assert rows[classic] == ["classic", "dispatch-model-queues"]
            assert rows[contract.DEAD_LETTER_QUEUE] == ["classic", "dispatch-dead-letter"]
            # An expired request leaves the quorum queue for the dead-letter queue.
            await channel.default_exchange.publish(
                aio_pika.Message(b'{"prompt": "too late"}', priority=5, expiration=0.001),
                routing_key=queue.name,
            )
            async with asyncio.timeout(30):
                while True:
                    message = await dead.get(fail=False)
                    if message is not None:
                        break
                    await asyncio.sleep(0.05)
            await message.ack()
            assert message.body == b'{"prompt": "too late"}'
            (death,) = cast("list[dict[str, Any]]", message.headers["x-death"])
            assert death["reason"] == "expired" and death["queue"] == quorum
        finally:
            await channel.queue_delete(quorum)
            await channel.queue_delete(classic)


async def test_keda_reads_waiting_and_served_requests_of_a_quorum_queue(configured43: Configured) -> None:
    """KEDA's default trigger takes ``messages`` of the management API: on a 4.3 quorum model queue
    that is the requests waiting plus those a consumer holds (being served)."""
    name = contract.model_queue("files-keda")
    connection = await aio_pika.connect(configured43.node.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        try:
            for priority in (1, 5, 9):
                await channel.default_exchange.publish(aio_pika.Message(b"{}", priority=priority), name)
            held = await queue.get(no_ack=False)  # being served
            url = f"{configured43.api}/queues/%2F/{urllib.parse.quote(name, safe='')}"
            counts: dict[str, Any] = {}
            async with asyncio.timeout(30):
                while (counts.get("messages"), counts.get("messages_unacknowledged")) != (3, 1):
                    await asyncio.sleep(0.2)
                    counts = await asyncio.to_thread(call, url)
            assert counts["messages_ready"] == 2 and counts["type"] == "quorum"
            await held.ack()
        finally:
            await channel.queue_delete(name)


def test_no_deprecation_caused_by_our_configuration(configured43: Configured) -> None:
    """Run last in this file: after the boot, the imports and the declarations above."""
    node = configured43.node
    assert node.json("list_deprecated_features", "--used") == []
    logged = {
        line.split("Deprecated features: `", 1)[1].split("`", 1)[0]
        for line in node.log_text().splitlines()
        if "Deprecated features: `" in line
    }
    assert logged <= DEPRECATIONS_OF_THE_MANAGEMENT_PLUGIN, logged
    errors = [line for line in node.log_text().splitlines() if "[error]" in line]
    assert not errors, errors
