"""The reading KEDA's ScaledObject makes counts the work a model does, not only its backlog.

A private RabbitMQ node with the management plugin (``harness/broker_node.py``) gets the chart's
autoscaler user exactly as ``contract/broker_roles.py`` defines it: the ``monitoring`` tag and no
configure, write or read permission. The trigger is the one the chart renders (``protocol: http``,
its queue, its activation value); the reading is the request KEDA's rabbitmq scaler (v2.20.2,
``getQueueInfoViaHTTP``) builds from it: ``GET <host>/api/queues/<vhost>/<queue>`` with HTTP basic
auth, its ``messages`` (ready plus unacknowledged) compared to ``activationValue``.

While the model's only consumer holds a request unacknowledged and nothing waits, that reading is
above zero (the model stays awake), while the ``amqp`` reading, a passive declare's message count,
is 0: the old default, which scaled busy models to zero. Idle, both read 0. The user may not take
messages or declare queues through the management API either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote_plus, urlsplit

import aio_pika
import httpx
import pytest

import contract
from contract.broker_roles import ROLES
from harness.broker_node import BrokerNode
from harness.chart_render import case_values, of_kind, render

AUTOSCALER = ("test-autoscaler", "autoscaler-password-for-tests")
CONSUMER = ("test-consumer", "consumer-password-for-tests")
MODEL = "qwen2.5-7b"  # a model of chart/ci/three-models-keda-values.yaml, scaled to zero when idle


@pytest.fixture(scope="module")
def node() -> Iterator[BrokerNode]:
    broker = BrokerNode(management=True)
    broker.start()
    try:
        broker.add_user(*AUTOSCALER, ROLES["autoscaler"])
        broker.add_user(*CONSUMER, ROLES["consumer"])
        yield broker
    finally:
        broker.stop()


def chart_trigger() -> dict[str, str]:
    """The rabbitmq trigger's metadata the chart renders for MODEL, with its defaults."""
    objects = render(case_values("three-models-keda-values"))
    for scaled in of_kind(objects, "ScaledObject"):
        (trigger,) = scaled["spec"]["triggers"]
        if trigger["metadata"]["queueName"] == contract.model_queue(MODEL):
            metadata: dict[str, str] = trigger["metadata"]
            return metadata
    raise AssertionError(f"no ScaledObject for {MODEL}")


def keda_url(host: str, queue: str) -> str:
    """The URL KEDA's scaler requests for ``host`` (the trigger's) and ``queue``: the host's last
    path segment is the vhost (``/`` when empty), the queue name query-escaped."""
    parts = urlsplit(host)
    *path, vhost = parts.path.split("/")
    prefix = "/".join(path)
    vhost_path = f"/{vhost}" if vhost else "/%2F"
    return f"{parts.scheme}://{parts.netloc}{prefix}/api/queues{vhost_path}/{quote_plus(queue)}"


def reading(node: BrokerNode, trigger: dict[str, str]) -> dict[str, Any]:
    """The management API's answer to KEDA's request, on this node instead of the cluster's Service."""
    assert trigger["protocol"] == "http" and trigger["mode"] == "QueueLength"
    chart_host = urlsplit(trigger["host"])
    assert chart_host.port == 15672  # the port the NetworkPolicy opens to KEDA
    host = trigger["host"].replace(chart_host.netloc, urlsplit(node.management_url).netloc)
    response = httpx.get(keda_url(host, trigger["queueName"]), auth=AUTOSCALER, timeout=10)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


async def settled_reading(node: BrokerNode, trigger: dict[str, str], **expected: int) -> dict[str, Any]:
    """The reading once the broker's statistics (collected every 5 s by default) show ``expected``."""
    deadline = time.monotonic() + 30
    while True:
        answer = reading(node, trigger)
        if all(answer.get(key) == value for key, value in expected.items()) or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.5)


async def amqp_reading(node: BrokerNode, queue: str) -> int:
    """What ``protocol: amqp`` reads: a passive declare's message count, as the autoscaler user."""
    connection = await aio_pika.connect(node.url_for(*AUTOSCALER))
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


def test_the_chart_trigger_counts_requests_being_served(node: BrokerNode) -> None:
    trigger = chart_trigger()
    queue = trigger["queueName"]
    activation = float(trigger["activationValue"])
    assert activation == 0  # the first waiting request wakes a sleeping model

    async def scenario() -> None:
        # The consumer side, as the consumer's user: its queue with the consumers' arguments.
        connection = await aio_pika.connect(node.url_for(*CONSUMER))
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1)
            model_queue = await channel.declare_queue(
                queue, durable=True, arguments=contract.model_queue_arguments(contract.QueueType.CLASSIC)
            )
            idle = await settled_reading(node, trigger, messages=0)
            assert idle["messages"] == 0 and not idle["messages"] > activation  # idle: may sleep
            assert await amqp_reading(node, queue) == 0

            # A request arrives (published as the broker's administrator, standing in for the sender).
            publisher = await aio_pika.connect(node.url)
            async with publisher:
                out = await publisher.channel()
                await out.default_exchange.publish(
                    aio_pika.Message(b'{"prompt": "hi"}', priority=5), routing_key=queue
                )
            waiting = await settled_reading(node, trigger, messages=1, messages_ready=1)
            assert waiting["messages"] == 1 and waiting["messages"] > activation  # it wakes the model

            # The only consumer takes it and serves it for a while: unacknowledged, nothing ready.
            held: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            tag = await model_queue.consume(held.put, no_ack=False)
            message = await asyncio.wait_for(held.get(), 10)
            busy = await settled_reading(node, trigger, messages_ready=0, messages_unacknowledged=1)
            assert busy["messages_ready"] == 0
            assert busy["messages_unacknowledged"] == 1
            assert busy["messages"] == 1 and busy["messages"] > activation  # busy: stays awake
            # What the old default read: nothing, so KEDA scaled the busy model to zero.
            assert await amqp_reading(node, queue) == 0

            # Served: acknowledged, and the model may sleep again.
            await message.ack()
            await model_queue.cancel(tag)
            done = await settled_reading(node, trigger, messages=0, messages_unacknowledged=0)
            assert done["messages"] == 0 and done["messages_unacknowledged"] == 0
            assert await amqp_reading(node, queue) == 0

    asyncio.run(scenario())


def test_the_autoscaler_reads_counts_and_nothing_else(node: BrokerNode) -> None:
    trigger = chart_trigger()
    base = node.management_url

    async def declare() -> None:
        connection = await aio_pika.connect(node.url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(
                trigger["queueName"],
                durable=True,
                arguments=contract.model_queue_arguments(contract.QueueType.CLASSIC),
            )

    asyncio.run(declare())
    queue = quote_plus(trigger["queueName"])
    # It cannot take messages (prompts) through the management API, nor declare or delete queues.
    refused = [
        httpx.post(
            f"{base}/api/queues/%2F/{queue}/get",
            auth=AUTOSCALER,
            json={"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"},
        ),
        httpx.put(f"{base}/api/queues/%2F/made-up", auth=AUTOSCALER, json={}),
        httpx.delete(f"{base}/api/queues/%2F/{queue}", auth=AUTOSCALER),
        httpx.post(
            f"{base}/api/exchanges/%2F/amq.default/publish",
            auth=AUTOSCALER,
            json={"properties": {}, "routing_key": "x", "payload": "x", "payload_encoding": "string"},
        ),
    ]
    # 401 not_authorised, or for a publish 400 with the broker's ACCESS_REFUSED.
    for response in refused:
        assert response.status_code in (400, 401), response.text
        assert "refused" in response.text.lower(), response.text
    assert reading(node, trigger)["name"] == trigger["queueName"]  # still there
    # Its one permission entry on "/" (every pattern empty) is what lets it see that vhost at all:
    # a monitoring user without one is refused the reading.
    node.ctl("add_user", "no-vhost", "no-vhost-password")
    node.ctl("set_user_tags", "no-vhost", "monitoring")
    denied = httpx.get(f"{base}/api/queues/%2F/{queue}", auth=("no-vhost", "no-vhost-password"))
    assert denied.status_code == 401
