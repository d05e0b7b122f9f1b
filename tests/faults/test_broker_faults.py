"""Broker faults under traffic, on a private RabbitMQ node: every request is accounted for.

The shared broker is never disturbed: this module starts its own node (see
``harness/broker_node.py``), points a sender and two consumers at it, drives
traffic, and injects the fault while requests are queued and streaming.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from harness.api import auth, wait_listed
from harness.broker_node import BrokerNode
from harness.processes import Processes
from harness.stack import Service, start, wait_http
from harness.testrun import unique
from harness.traffic import Tally, drive

CLIENTS = 12


@dataclass
class FaultStack:
    sender: Service
    model: str
    backends: list[Service]
    consumers: list[Service]


@pytest.fixture(scope="module")
def fault_stack(processes: Processes, broker_node: BrokerNode) -> FaultStack:
    model = unique("faults")
    stack = FaultStack(processes.sender("postgres", rabbitmq_url=broker_node.url), model, [], [])
    for side in ("a", "b"):
        backend = processes.simulator(model, name=f"simulator-{model}-{side}", max_num_seqs=4, itl_ms=5)
        stack.backends.append(backend)
        stack.consumers.append(start_consumer(processes, stack, broker_node, backend, side))
    return stack


def start_consumer(
    processes: Processes, stack: FaultStack, broker_node: BrokerNode, backend: Service, name: str
) -> Service:
    consumer = processes.consumer(
        stack.model,
        backend,
        name=f"consumer-{stack.model}-{name}",
        rabbitmq_url=broker_node.url,
        max_inflight=4,
        flow="fixed",
        health_interval=0.2,
    )
    # Ready once consuming: a test that stops the other consumer next must not find none.
    wait_http(consumer, "/health")
    return consumer


async def readiness(sender: Service) -> int:
    async with httpx.AsyncClient(base_url=sender.url, timeout=5) as http:
        return (await http.get("/health/ready")).status_code


async def run_with_fault(
    sender: Service, token: str, model: str, fault: str, inject: Callable[[], None]
) -> tuple[Tally, Tally]:
    """Traffic before, during and after ``inject`` (a blocking callable); then traffic again."""
    await wait_listed(sender, token, model, timeout=30)
    during = Tally()
    stop = asyncio.Event()
    load = asyncio.create_task(drive(sender.url, token, model, clients=CLIENTS, until=stop, tally=during))
    await asyncio.sleep(1.5)  # requests queued and streaming when the fault hits
    await asyncio.to_thread(inject)
    await asyncio.sleep(3)
    stop.set()
    await load
    # Recovered: once the sender is ready again, everything is answered.
    for _ in range(300):
        if await readiness(sender) == 200:
            break
        await asyncio.sleep(0.1)
    await wait_listed(sender, token, model, timeout=30)
    after = Tally()
    stop_after = asyncio.Event()
    load = asyncio.create_task(drive(sender.url, token, model, clients=4, until=stop_after, tally=after))
    await asyncio.sleep(2)
    stop_after.set()
    await load
    print(f"\n{fault}: during {during.line()}\n{fault}: after {after.line()}")
    return during, after


def check(during: Tally, after: Tally) -> None:
    assert not during.defects, during.defects
    assert during.outcomes["ok"] > 0
    assert not after.defects, after.defects
    assert after.total > 0 and after.outcomes["ok"] == after.total, after.line()


async def test_connections_closed_by_the_broker(
    fault_stack: FaultStack, broker_node: BrokerNode, token: str
) -> None:
    sender, model = fault_stack.sender, fault_stack.model
    during, after = await run_with_fault(
        sender, token, model, "close_all_connections", broker_node.close_all_connections
    )
    check(during, after)


async def test_broker_restart(fault_stack: FaultStack, broker_node: BrokerNode, token: str) -> None:
    sender, model = fault_stack.sender, fault_stack.model
    saw_unready: list[int] = []

    def restart() -> None:
        broker_node.ctl("stop_app")
        saw_unready.append(asyncio.run(_ready_after_a_while(sender)))
        broker_node.ctl("start_app")

    during, after = await run_with_fault(sender, token, model, "stop_app/start_app", restart)
    check(during, after)
    assert saw_unready == [503], "readiness stayed true while the broker was down"


async def _ready_after_a_while(sender: Service) -> int:
    for _ in range(50):
        status = await readiness(sender)
        if status != 200:
            return status
        await asyncio.sleep(0.1)
    return 200


async def test_sender_connection_alone_is_closed(
    fault_stack: FaultStack, broker_node: BrokerNode, token: str
) -> None:
    """Replies published while the sender reconnects wait in its reply queue: none is lost."""
    sender, model = fault_stack.sender, fault_stack.model
    await wait_listed(sender, token, model, timeout=30)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        streams = [
            asyncio.create_task(
                http.post(
                    "/v1/completions",
                    json={"model": model, "prompt": "x", "max_tokens": 200, "stream": False},
                )
            )
            for _ in range(4)
        ]
        await asyncio.sleep(0.5)

        def close_sender() -> None:
            listing = broker_node.ctl("list_connections", "pid", "client_properties")
            for line in listing.splitlines():
                if "sender-" in line:
                    broker_node.ctl("close_connection", line.split()[0], "fault injection")

        await asyncio.to_thread(close_sender)
        answers = await asyncio.gather(*streams)
    for response in answers:
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 200


async def test_consumer_reply_connection_alone_is_closed(
    fault_stack: FaultStack, broker_node: BrokerNode, token: str
) -> None:
    """A consumer loses only the connection it publishes replies on: it gives the requests in flight
    back (dropping its consuming connection too), so none hangs or is cut short without an error."""
    sender, model = fault_stack.sender, fault_stack.model

    def close_reply_connections() -> None:
        listing = broker_node.ctl("list_connections", "pid", "client_properties")
        closed = 0
        for line in listing.splitlines():
            if "consumer-" in line and "-publish" in line:
                broker_node.ctl("close_connection", line.split()[0], "fault injection")
                closed += 1
        assert closed == 2, listing

    during, after = await run_with_fault(
        sender, token, model, "consumer reply connections closed", close_reply_connections
    )
    check(during, after)


async def test_consumer_killed_under_traffic(
    processes: Processes, fault_stack: FaultStack, broker_node: BrokerNode, token: str
) -> None:
    """SIGKILL: queued and not-yet-answered requests go to the other consumer; streams under way
    end with an error event; then a replacement starts."""
    stack = fault_stack

    def kill() -> None:
        stack.consumers[0].kill()
        stack.consumers[0] = start_consumer(processes, stack, broker_node, stack.backends[0], "a-after-kill")

    during, after = await run_with_fault(stack.sender, token, stack.model, "consumer SIGKILL", kill)
    check(during, after)


async def test_consumer_terminated_under_traffic(
    processes: Processes, fault_stack: FaultStack, broker_node: BrokerNode, token: str
) -> None:
    """SIGTERM (a Kubernetes eviction): requests in flight finish, nothing fails."""
    stack = fault_stack

    def terminate() -> None:
        stack.consumers[1].stop()
        stack.consumers[1] = start_consumer(processes, stack, broker_node, stack.backends[1], "b-after-term")

    during, after = await run_with_fault(stack.sender, token, stack.model, "consumer SIGTERM", terminate)
    check(during, after)
    assert during.outcomes["ok"] == during.total, during.line()


async def test_backend_restarted_under_traffic(
    processes: Processes, fault_stack: FaultStack, token: str
) -> None:
    """vLLM dies and comes back on the same port: its consumer pauses, requests that had not
    started are retried on the other replica, then it serves again."""
    stack = fault_stack

    def restart_backend() -> None:
        old = stack.backends[0]
        old.kill()
        time.sleep(1)
        new = start(old.name + "-again", "simulator", old.env, processes.log_dir, url=old.url)
        processes.services.append(new)
        wait_http(new, "/health")
        stack.backends[0] = new

    during, after = await run_with_fault(stack.sender, token, stack.model, "backend restart", restart_backend)
    check(during, after)


async def test_backend_hung_under_traffic(fault_stack: FaultStack, token: str) -> None:
    """vLLM stops answering (SIGSTOP) for a while: requests caught in it end at their deadline or are
    served elsewhere; the consumer pauses and resumes."""
    stack = fault_stack

    def hang() -> None:
        backend = stack.backends[1]
        backend.process.send_signal(signal.SIGSTOP)
        time.sleep(3)
        backend.process.send_signal(signal.SIGCONT)

    during, after = await run_with_fault(stack.sender, token, stack.model, "backend hung 3 s", hang)
    check(during, after)


async def _post(http: httpx.AsyncClient, model: str, *, stream: bool = False) -> httpx.Response:
    body = {"model": model, "prompt": "held", "max_tokens": 20, "stream": stream}
    return await http.post("/v1/completions", json=body, headers={"X-Request-Timeout": "60"})


async def test_requests_sent_while_the_broker_restarts_are_held_and_served(
    fault_stack: FaultStack, broker_node: BrokerNode, token: str
) -> None:
    """A node restarted for a few seconds: requests sent while it is down wait for it
    (``SENDER_BROKER_WAIT``) and are answered, streamed or not, instead of 503 at once."""
    sender, model = fault_stack.sender, fault_stack.model
    await wait_listed(sender, token, model, timeout=30)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=90) as http:
        await asyncio.to_thread(broker_node.ctl, "stop_app")
        try:
            sent = [asyncio.create_task(_post(http, model, stream=n % 2 == 1)) for n in range(6)]
            await asyncio.sleep(2)  # the broker stays down a while
        finally:
            await asyncio.to_thread(broker_node.ctl, "start_app")
        answers = await asyncio.gather(*sent)
    assert [answer.status_code for answer in answers] == [200] * 6, [answer.text for answer in answers]
    assert all(answer.text.rstrip().endswith("data: [DONE]") for answer in answers[1::2])


async def test_holding_is_bounded_in_time_and_count(
    processes: Processes, fault_stack: FaultStack, broker_node: BrokerNode, token: str
) -> None:
    """Past ``SENDER_BROKER_WAIT_MAX`` held requests, or ``SENDER_BROKER_WAIT`` seconds, the client
    gets 503 with ``Retry-After`` while the broker is still down; the requests held get served."""
    model = fault_stack.model
    few = processes.sender("postgres", rabbitmq_url=broker_node.url, broker_wait=60, broker_wait_max=2)
    brief = processes.sender("postgres", rabbitmq_url=broker_node.url, broker_wait=0.5)
    for sender in (few, brief):
        await wait_listed(sender, token, model, timeout=30)
    async with (
        httpx.AsyncClient(base_url=few.url, headers=auth(token), timeout=90) as to_few,
        httpx.AsyncClient(base_url=brief.url, headers=auth(token), timeout=90) as to_brief,
    ):
        await asyncio.to_thread(broker_node.ctl, "stop_app")
        try:
            held = [asyncio.create_task(_post(to_few, model)) for _ in range(2)]
            await _until_held(few, 2)
            refused = await asyncio.gather(*[_post(to_few, model) for _ in range(3)])
            timed_out = await asyncio.gather(*[_post(to_brief, model) for _ in range(2)])
            assert not any(task.done() for task in held)  # still held: the broker is still down
        finally:
            await asyncio.to_thread(broker_node.ctl, "start_app")
        served = await asyncio.gather(*held)
    for answer in [*refused, *timed_out]:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] in ("broker_unavailable", "queue_unavailable")
        assert answer.headers["retry-after"]
    assert [answer.status_code for answer in served] == [200, 200], [answer.text for answer in served]
    few.stop()
    brief.stop()


async def _until_held(sender: Service, count: int) -> None:
    """Wait until ``count`` requests are held by ``sender`` for the broker."""
    async with httpx.AsyncClient(base_url=sender.metrics_url, timeout=5) as http:
        for _ in range(300):
            text = (await http.get("/metrics")).text
            for line in text.splitlines():
                if line.startswith("dispatcher_broker_held_requests ") and float(line.split()[1]) >= count:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{count} requests never got held")
