"""Least privilege on the broker, and TLS to it, proved on a private RabbitMQ node.

The node (``harness/broker_node.py``) gets the dispatcher's three users with exactly the
permissions of ``contract/broker_roles.py``, the ones the chart and compose give them. A sender
and a consumer running as those users serve whole and streamed answers and cancel a generation
whose client left; each user is then refused what its role does not need. The same node listens
for ``amqps://`` with a certificate from a CA made for the test: a sender and a consumer connect
with the CA file (the consumer with a client certificate too) and answer; without the CA the
broker is not trusted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiormq
import httpx
import pytest

import contract
from contract.broker_roles import ROLES
from harness.api import auth, wait_listed
from harness.broker_node import BrokerNode
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import unique

USERS = {role: (f"test-{role}", f"{role}-password-for-tests") for role in ROLES}
COMPOSE_USERS = Path(__file__).resolve().parents[2] / "rabbitmq" / "compose-users.json"


@pytest.fixture(scope="module")
def node() -> Iterator[BrokerNode]:
    broker = BrokerNode(tls=True)
    broker.start()
    try:
        for role, (user, password) in USERS.items():
            broker.add_user(user, password, ROLES[role])
        yield broker
    finally:
        broker.stop()


def url(node: BrokerNode, role: str, *, tls: bool = False) -> str:
    return node.url_for(*USERS[role], tls=tls)


@dataclass
class RoleStack:
    model: str
    sender: Service
    backend: Service
    consumer: Service


@pytest.fixture(scope="module")
def role_stack(processes: Processes, node: BrokerNode) -> RoleStack:
    model = unique("roles")
    # First the sender: it declares the configured models' queues and the cancellation stream,
    # which the consumer then reads at its start, each with its role's permissions.
    sender = processes.sender("postgres", rabbitmq_url=url(node, "sender"), models=f"{model},{SLEEPING}")
    backend = processes.simulator(model, name=f"simulator-{model}", max_num_seqs=4, ttft_ms=5, itl_ms=5)
    consumer = processes.consumer(
        model,
        backend,
        name=f"consumer-{model}",
        rabbitmq_url=url(node, "consumer"),
        dead_letter_queue=contract.DEAD_LETTER_QUEUE,  # the name the role allows
    )
    return RoleStack(model, sender, backend, consumer)


SLEEPING = unique("roles-sleeping")
"""A configured model that never runs: the sender declares its queue."""


async def aborted(backend: Service) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(backend.url + "/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("simulator:requests_aborted_total")
    )


async def chat(sender: Service, token: str, model: str) -> None:
    """A whole answer, a streamed one, and a streamed one whose client leaves (cancelled)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        whole = await http.post("/v1/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["message"]["content"]
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            text = "".join([chunk async for chunk in response.aiter_text()])
        assert text.rstrip().endswith("data: [DONE]"), text[-200:]


async def test_least_privileged_users_serve(role_stack: RoleStack, token: str) -> None:
    stack = role_stack
    await wait_listed(stack.sender, token, stack.model, timeout=30)  # announcements and roll call pass
    await chat(stack.sender, token, stack.model)
    long = {"model": stack.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 400}
    async with (
        httpx.AsyncClient(base_url=stack.sender.url, headers=auth(token), timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as response,
    ):
        assert response.status_code == 200
        async for _ in response.aiter_bytes():
            break  # the first piece, then hang up: the sender cancels on the control exchange
    for _ in range(100):
        if await aborted(stack.backend) >= 1:
            break
        await asyncio.sleep(0.05)
    assert await aborted(stack.backend) >= 1, "the cancellation did not reach the consumer"
    for service in (stack.sender, stack.consumer):
        assert "ACCESS_REFUSED" not in service.log_path.read_text(errors="replace"), service.log_tail()
        assert "could not" not in service.log_path.read_text(errors="replace"), service.log_tail()


async def refused(broker_url: str, action: str, model: str, reply_queue: str) -> BaseException | None:
    """Try one AMQP action on a fresh connection; the exception it raised, or None if allowed."""
    connection = await aiormq.connect(broker_url)
    try:
        channel = await connection.channel()
        try:
            if action == "consume model queue":
                await channel.basic_consume(contract.model_queue(model), lambda _: asyncio.sleep(0))
            elif action == "consume reply queue":
                await channel.basic_consume(reply_queue, lambda _: asyncio.sleep(0))
            elif action == "purge model queue":
                await channel.queue_purge(contract.model_queue(model))
            elif action == "declare model queue":
                await channel.queue_declare(
                    contract.model_queue(unique("other")),
                    durable=True,
                    arguments=contract.model_queue_arguments(contract.QueueType.CLASSIC),
                )
            elif action == "declare reply queue":
                await channel.queue_declare(contract.REPLY_QUEUE_PREFIX + "forged", durable=True)
            elif action in {"announce", "cancel", "rollcall"}:
                await channel.basic_publish(b"{}", exchange=contract.CONTROL_EXCHANGE, routing_key=action)
            elif action == "publish request":
                await channel.basic_publish(b"{}", routing_key=contract.model_queue(model))
            elif action == "read cancellations":
                await channel.basic_qos(prefetch_count=10)
                await channel.basic_consume(
                    contract.CANCEL_STREAM, lambda _: asyncio.sleep(0), arguments={"x-stream-offset": "first"}
                )
            elif action == "declare sleeping model queue":
                await channel.queue_declare(
                    contract.model_queue(SLEEPING),
                    durable=True,
                    arguments=contract.model_queue_arguments(contract.QueueType.CLASSIC),
                )
            elif action == "queue depth":
                declared = await channel.queue_declare(contract.model_queue(model), passive=True)
                assert declared.message_count is not None
            else:
                raise AssertionError(action)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            return exc
        except aiormq.exceptions.ChannelClosed as exc:
            return exc
        return None
    finally:
        await connection.close()


# (role, action, allowed)
CASES = [
    ("sender", "consume model queue", False),
    ("sender", "purge model queue", False),
    ("sender", "declare model queue", True),  # the configured models' (SENDER_MODELS), before any consumer
    ("sender", "declare sleeping model queue", True),
    ("sender", "read cancellations", False),
    ("sender", "announce", False),  # a sender cannot pose as a consumer
    ("sender", "cancel", True),
    ("sender", "rollcall", True),
    ("sender", "publish request", True),
    ("sender", "queue depth", True),
    ("consumer", "consume reply queue", False),  # another sender's replies
    ("consumer", "declare reply queue", False),
    ("consumer", "cancel", False),  # a consumer cannot cancel other requests
    ("consumer", "rollcall", False),
    ("consumer", "announce", True),
    ("consumer", "consume model queue", True),
    ("consumer", "read cancellations", True),  # those published before it started
    ("autoscaler", "queue depth", True),
    ("autoscaler", "consume model queue", False),
    ("autoscaler", "purge model queue", False),
    ("autoscaler", "publish request", False),
    ("autoscaler", "declare model queue", False),
    ("autoscaler", "read cancellations", False),
    ("autoscaler", "announce", False),
]


async def test_each_user_is_refused_outside_its_role(role_stack: RoleStack, node: BrokerNode) -> None:
    queues = node.ctl("list_queues", "-q", "--no-table-headers", "name").split()
    reply_queue = next(q for q in queues if q.startswith(contract.REPLY_QUEUE_PREFIX))
    wrong = []
    for role, action, allowed in CASES:
        error = await refused(url(node, role), action, role_stack.model, reply_queue)
        if allowed and error is not None:
            wrong.append(f"{role} could not {action}: {error}")
        elif not allowed and not isinstance(error, aiormq.exceptions.ChannelAccessRefused):
            wrong.append(f"{role} was not refused to {action}: {error!r}")
    assert not wrong, "\n".join(wrong)
    # The machine's own guest user of this private node still works (nothing else was changed).
    assert await refused(node.url, "queue depth", role_stack.model, reply_queue) is None


async def test_amqps_with_the_test_ca(
    processes: Processes, node: BrokerNode, token: str, tmp_path: Path
) -> None:
    certificates = node.certificates
    model = unique("tls")
    backend = processes.simulator(model, name=f"simulator-{model}", ttft_ms=5, itl_ms=5)
    processes.consumer(
        model,
        backend,
        name=f"consumer-{model}",
        rabbitmq_url=url(node, "consumer", tls=True),
        rabbitmq_ca_file=certificates["ca"],
        rabbitmq_cert_file=certificates["client_cert"],
        rabbitmq_key_file=certificates["client_key"],
        dead_letter_queue=contract.DEAD_LETTER_QUEUE,
    )
    sender = processes.sender(
        "postgres", rabbitmq_url=url(node, "sender", tls=True), rabbitmq_ca_file=certificates["ca"]
    )
    await wait_listed(sender, token, model, timeout=30)
    await chat(sender, token, model)
    tls_connections = node.ctl(
        "list_connections", "-q", "--no-table-headers", "user", "ssl", "peer_cert_subject"
    )
    lines = [line.split("\t") for line in tls_connections.splitlines() if line.strip()]
    assert any(user == USERS["sender"][0] and tls == "true" for user, tls, *_ in lines), lines
    assert any(
        user == USERS["consumer"][0] and tls == "true" and "dispatch-client" in rest[0]
        for user, tls, *rest in lines
    ), lines
    # Without the test CA the broker's certificate is not trusted: nothing is sent to it.
    with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await aio_pika.connect(url(node, "sender", tls=True), timeout=10)


async def test_compose_users_import_and_keep_their_roles(role_stack: RoleStack, node: BrokerNode) -> None:
    """rabbitmq/compose-users.json, as compose's broker-init imports it: its users log in with the
    passwords of docker-compose.yml's URLs and have their roles."""
    node.ctl("import_definitions", str(COMPOSE_USERS))
    sender = node.url_for("dispatch-sender", "sender-demo")
    consumer = node.url_for("dispatch-consumer", "consumer-demo")
    assert await refused(sender, "queue depth", role_stack.model, "") is None
    assert isinstance(
        await refused(sender, "consume model queue", role_stack.model, ""),
        aiormq.exceptions.ChannelAccessRefused,
    )
    assert await refused(consumer, "announce", role_stack.model, "") is None
    assert isinstance(
        await refused(consumer, "cancel", role_stack.model, ""), aiormq.exceptions.ChannelAccessRefused
    )
