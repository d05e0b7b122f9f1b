"""A node lost, nothing lost: the dispatcher on a 3-node RabbitMQ 4.3 cluster while nodes stop, die, restart.

A sender, two consumers of one model (each with its simulator) and one
consumer of a one-slot model run against the cluster, each through a TCP proxy
(``harness.tcpproxy``) that sends every new connection to the first node that
accepts it: the sender prefers node 0, the consumers node 1, and the model
queues are declared first on node 2, so their leader starts there (quorum
queues are placed on the declaring client's node). Services then move to
another node only when theirs goes away.

Every request of the traffic is accounted for (``harness.traffic``): answered
in full, or a documented OpenAI error; hung requests, dropped client
connections, undocumented errors and answers cut short without an error are
defects. ``deadline_exceeded`` is a defect too: a request whose answer was lost
must end at once, not at its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import httpx
import pytest
import pytest_asyncio

import contract
from contract import queues
from harness import rabbitmq43
from harness.api import auth, wait_listed
from harness.observe import wait_running
from harness.processes import Processes
from harness.stack import Service
from harness.tcpproxy import TcpProxy, ThreadedProxy
from harness.testrun import Tokens, unique
from harness.traffic import Tally, drive

pytestmark = pytest.mark.timeout(240, func_only=True)

CLIENTS = 8
BLOCKER_TOKENS = 1200
"""At 5 ms a token the one-slot backend stays busy ~6 s: long enough to lose a node meanwhile."""


@dataclass
class ClusterStack:
    nodes: list[rabbitmq43.Node43]
    sender: Service
    model: str
    slow_model: str
    slow_backend: Service
    token: str
    priority_tokens: dict[int, str]


def proxy_to(nodes: list[rabbitmq43.Node43], first: int) -> ThreadedProxy:
    ring = [nodes[(first + step) % len(nodes)] for step in range(len(nodes))]
    proxy = ThreadedProxy(
        TcpProxy("127.0.0.1", ring[0].port, tuple(("127.0.0.1", node.port) for node in ring[1:]))
    )
    proxy.start()
    return proxy


def url_of(proxy: ThreadedProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


async def declare_model_queue(node: rabbitmq43.Node43, model: str) -> None:
    """Declared first on ``node``, the quorum queue's leader starts there."""
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()
        arguments = queues.model_queue_arguments(queues.QueueType.QUORUM)
        await channel.declare_queue(contract.model_queue(model), durable=True, arguments=arguments)


@pytest_asyncio.fixture(scope="module")
async def cluster_stack(
    services: None, cluster43: list[rabbitmq43.Node43], log_dir: Path, tokens: Tokens
) -> AsyncIterator[ClusterStack]:
    processes = Processes(log_dir / "failover")
    proxies = [proxy_to(cluster43, 0), proxy_to(cluster43, 1)]
    sender_url, consumer_url = url_of(proxies[0]), url_of(proxies[1])
    model, slow_model = unique("failover"), unique("failover-slot")
    try:
        for name in (model, slow_model):
            await declare_model_queue(cluster43[2], name)
        fast = {"max_inflight": 4, "flow": "fixed", "health_interval": 0.2, "reconnect_interval": 0.5}
        for side in ("a", "b"):
            backend = processes.simulator(model, name=f"simulator-{model}-{side}", max_num_seqs=4, itl_ms=5)
            processes.consumer(
                model, backend, name=f"consumer-{model}-{side}", rabbitmq_url=consumer_url, **fast
            )
        slow_backend, _ = processes.one_slot(slow_model, rabbitmq_url=consumer_url, reconnect_interval=0.5)
        sender = processes.sender("postgres", rabbitmq_url=sender_url, broker_reconnect_seconds=0.5)
        token = await tokens.create("failover", threshold=10_000)
        priority_tokens = {p: await tokens.create(f"failover-p{p}", priority=p) for p in (2, 5, 8)}
        await wait_listed(sender, token, model, timeout=30)
        await wait_listed(sender, token, slow_model, timeout=30)
        yield ClusterStack(cluster43, sender, model, slow_model, slow_backend, token, priority_tokens)
    finally:
        processes.stop_all()
        for proxy in proxies:
            proxy.close()


def leader_of(stack: ClusterStack, queue: str) -> rabbitmq43.Node43:
    for node in stack.nodes:
        if node.running():
            rows = {row[0]: row[1] for row in node.list_queues("name", "leader")}
            return next(member for member in stack.nodes if member.name == rows[queue])
    raise AssertionError("no node is running")


def restore(stack: ClusterStack) -> None:
    """Start whatever node is down and wait until every node sees all three running."""
    for node in stack.nodes:
        node.start()
    names = [node.name for node in stack.nodes]
    for node in stack.nodes:
        node.wait_cluster(names)


def wait_all_members_online(stack: ClusterStack, timeout: float = 180) -> None:
    """Wait until every quorum queue has all three members online (what a rolling upgrade waits for
    before the next node: stopping one then leaves each queue a majority)."""
    deadline = time.monotonic() + timeout
    lagging: list[str] = []
    for attempt in itertools.count():
        if time.monotonic() > deadline:
            break
        running = [node for node in stack.nodes if node.running()]
        node = running[attempt % len(running)]  # a node still booting may not answer yet: ask another
        with contextlib.suppress(RuntimeError, ValueError, subprocess.TimeoutExpired):
            rows = node.json("list_queues", "name", "type", "online", timeout=60)
            lagging = [
                row["name"]
                for row in rows
                if row["type"] == "quorum" and len(row.get("online") or []) < len(stack.nodes)
            ]
            if not lagging:
                return
        time.sleep(0.5)
    raise AssertionError(f"quorum queues without all members online after {timeout} s: {lagging}")


async def traffic_through(stack: ClusterStack, fault: str, inject: Callable[[], None]) -> tuple[Tally, Tally]:
    """Traffic before, during and after ``inject`` (blocking, run in a thread); then traffic again."""
    await wait_listed(stack.sender, stack.token, stack.model, timeout=30)
    during = Tally()
    stop = asyncio.Event()
    load = asyncio.create_task(
        drive(stack.sender.url, stack.token, stack.model, clients=CLIENTS, until=stop, tally=during)
    )
    await asyncio.sleep(1.5)  # requests queued and streaming when the fault hits
    await asyncio.to_thread(inject)
    await asyncio.sleep(2)
    stop.set()
    await load
    await wait_listed(stack.sender, stack.token, stack.model, timeout=30)
    after = Tally()
    stop_after = asyncio.Event()
    load = asyncio.create_task(
        drive(stack.sender.url, stack.token, stack.model, clients=4, until=stop_after, tally=after)
    )
    await asyncio.sleep(2)
    stop_after.set()
    await load
    print(f"\n{fault}: during {during.line()}\n{fault}: after {after.line()}")
    return during, after


def errors_of(tally: Tally) -> int:
    return sum(count for outcome, count in tally.outcomes.items() if outcome != "ok")


def check(during: Tally, after: Tally) -> None:
    """Nothing hung, dropped or unexplained; served during the fault; everything served after it."""
    assert not during.defects, during.defects
    assert during.outcomes["ok"] > 0
    assert not after.defects, after.defects
    assert after.total > 0 and after.outcomes["ok"] == after.total, after.line()


def sender_node(stack: ClusterStack) -> rabbitmq43.Node43:
    """The node holding both of the sender's connections."""
    node = next(node for node in stack.nodes if node.running())
    listing = node.ctl("list_connections", "-q", "--no-table-headers", "pid", "client_properties")
    lines = [line for line in listing.splitlines() if "sender-" in line]
    assert len(lines) == 2, listing
    return next(member for member in stack.nodes if all(f"<{member.name}." in line for line in lines))


def reply_queue(stack: ClusterStack) -> str:
    node = next(node for node in stack.nodes if node.running())
    names = [row[0] for row in node.list_queues("name") if row[0].startswith(contract.REPLY_QUEUE_PREFIX)]
    assert len(names) == 1, names
    return names[0]


async def test_sender_node_killed_under_traffic(cluster_stack: ClusterStack) -> None:
    """The node holding the sender's connections and its reply queue's leader SIGKILLed (first of the
    faults here, while the layout is the one set up): the reply pieces that node had delivered to the
    sender, not yet read, come again on the sender's new subscription, and nothing waits for its
    deadline."""
    stack = cluster_stack
    victim = sender_node(stack)
    assert leader_of(stack, reply_queue(stack)) is victim
    try:
        during, after = await traffic_through(stack, f"sender node {victim.name} SIGKILLed", victim.kill)
    finally:
        await asyncio.to_thread(restore, stack)
    check(during, after)


async def test_model_queue_leader_stopped_under_traffic(cluster_stack: ClusterStack) -> None:
    stack = cluster_stack
    leader = leader_of(stack, contract.model_queue(stack.model))
    try:
        during, after = await traffic_through(stack, f"leader {leader.name} stopped", leader.stop)
    finally:
        await asyncio.to_thread(restore, stack)
    check(during, after)


async def test_model_queue_leader_killed_under_traffic(cluster_stack: ClusterStack) -> None:
    stack = cluster_stack
    leader = leader_of(stack, contract.model_queue(stack.model))
    try:
        during, after = await traffic_through(stack, f"leader {leader.name} SIGKILLed", leader.kill)
    finally:
        await asyncio.to_thread(restore, stack)
    check(during, after)


async def test_queued_requests_survive_the_leader_in_priority_order(cluster_stack: ClusterStack) -> None:
    """While the one slot is busy, four low and one high priority request wait in the quorum queue;
    its leader stops; they are all served, the high one first, the low ones in order."""
    stack = cluster_stack
    queue = contract.model_queue(stack.slow_model)
    finished: list[str] = []

    async def call(http: httpx.AsyncClient, label: str, priority: int, tokens: int) -> None:
        response = await http.post(
            "/v1/completions",
            json={"model": stack.slow_model, "prompt": label, "max_tokens": tokens},
            headers=auth(stack.priority_tokens[priority]),
        )
        assert response.status_code == 200, response.text
        finished.append(label)

    waiting = [(f"low{index}", 2) for index in range(4)] + [("high", 8)]
    leader = leader_of(stack, queue)
    async with httpx.AsyncClient(base_url=stack.sender.url, timeout=90) as http:
        tasks = [asyncio.create_task(call(http, "blocker", 5, BLOCKER_TOKENS))]
        await wait_running(stack.slow_backend)
        for depth, (label, priority) in enumerate(waiting, start=1):
            tasks.append(asyncio.create_task(call(http, label, priority, 2)))
            await wait_depth(stack, queue, depth)
        try:
            await asyncio.to_thread(leader.stop)
            await asyncio.gather(*tasks)
        finally:
            await asyncio.to_thread(restore, stack)
    print(f"\nleader {leader.name} stopped with 5 requests queued; finished: {finished}")
    assert [label for label in finished if label != "blocker"] == ["high", "low0", "low1", "low2", "low3"]


async def wait_depth(stack: ClusterStack, queue: str, depth: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        node = next(node for node in stack.nodes if node.running())
        connection = await aio_pika.connect(node.url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            seen = declared.declaration_result.message_count or 0
        if seen >= depth:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{queue} holds {seen} messages, never {depth}")


async def test_sender_hears_again_after_the_broker_cancels_its_reply_subscription(
    cluster_stack: ClusterStack,
) -> None:
    """The reply queue deleted under the sender: the broker cancels its subscription (``basic.cancel``);
    the sender declares the queue again and subscribes again, and answers arrive as before. A request
    whose answer was lost with the queue gets an error at once (502), never a wait until its deadline."""
    stack = cluster_stack
    node = next(node for node in stack.nodes if node.running())
    replies = [row[0] for row in node.list_queues("name") if row[0].startswith(contract.REPLY_QUEUE_PREFIX)]
    assert len(replies) == 1, replies
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=stack.sender.url, headers=auth(stack.token), timeout=30) as http:
        slow = asyncio.create_task(
            http.post("/v1/completions", json={"model": stack.model, "prompt": "x", "max_tokens": 400})
        )
        await asyncio.sleep(0.5)  # being answered when its reply queue goes
        await asyncio.to_thread(node.ctl, "delete_queue", replies[0])
        lost = await slow
        deadline = time.monotonic() + 20
        while True:
            response = await http.post(
                "/v1/completions", json={"model": stack.model, "prompt": "again", "max_tokens": 5}
            )
            statuses.append(response.status_code)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    print(f"\nreply queue deleted: the answer under way got {lost.status_code}; then {statuses}")
    assert lost.status_code in (200, 502), lost.text  # finished before the delete, or lost with it
    if lost.status_code == 502:
        assert lost.json()["error"]["code"] == "bad_gateway"
    assert response.status_code == 200, response.text
    assert "cancelled the reply subscription" in stack.sender.log_path.read_text()
    now = [row for row in node.list_queues("name", "type") if row[0].startswith(contract.REPLY_QUEUE_PREFIX)]
    assert len(now) == 1 and now[0][0] != replies[0] and now[0][1] == "quorum", now  # a new one


@pytest.mark.timeout(600, func_only=True)
async def test_rolling_restart_of_all_three_nodes_under_load(cluster_stack: ClusterStack) -> None:
    """Each node in turn, once no quorum queue depends on it: stopped cleanly, started, rejoined."""
    stack = cluster_stack

    def rolling_restart() -> None:
        names = [node.name for node in stack.nodes]
        started = time.monotonic()
        for node in stack.nodes:
            wait_all_members_online(stack)
            print(f"{time.monotonic() - started:5.1f} s: stopping {node.name}")
            node.stop()
            print(f"{time.monotonic() - started:5.1f} s: starting {node.name}")
            node.start()
            for member in stack.nodes:
                member.wait_cluster(names)
        wait_all_members_online(stack)
        print(f"{time.monotonic() - started:5.1f} s: all three restarted, every quorum queue whole")

    try:
        during, after = await traffic_through(stack, "rolling restart", rolling_restart)
    finally:
        await asyncio.to_thread(restore, stack)
    print(
        f"rolling restart: {errors_of(during)} errors, {len(during.defects)} defects (hung, dropped, other)"
    )
    check(during, after)
