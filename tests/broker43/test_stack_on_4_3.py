"""Where the dispatcher stands today on RabbitMQ 4.3: the current stack, unchanged, on a 4.3 node.

A simulator, one consumer and one sender (``harness.processes``, with
``rabbitmq_url`` the 4.3 node's) answer a chat request end to end. The model
queue is still a classic queue with ``x-max-priority`` (still supported on 4.3).

The consumer sets its prefetch with a channel-wide (``global``) ``basic.qos``,
which 4.3 denies by default: the broker answers it, applies it per consumer,
and logs ``Deprecated features: global_qos``. The last test says the dispatcher
should not do that; it is marked ``xfail(strict=True)`` while the product still
does, so it turns red the day the consumer stops, and whoever fixes it removes
the mark.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletion

import contract
from harness import rabbitmq43
from harness.api import wait_listed
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import Tokens, unique

pytestmark = pytest.mark.timeout(60, func_only=True)


@dataclass
class Served:
    model: str
    sender: Service
    answer: ChatCompletion


@pytest_asyncio.fixture(scope="module")
async def served43(
    services: None, node43: rabbitmq43.Node43, log_dir: Path, tokens: Tokens
) -> AsyncIterator[Served]:
    """Simulator, consumer and sender on the 4.3 node (tokens in this run's database), one chat answered."""
    processes = Processes(log_dir / "broker43")
    model = unique("on-4-3")
    try:
        backend = processes.simulator(model)
        processes.consumer(model, backend, rabbitmq_url=node43.url)
        sender = processes.sender("postgres", rabbitmq_url=node43.url)
        secret = await tokens.create("on-4-3")
        await wait_listed(sender, secret, model)
        async with openai.AsyncOpenAI(base_url=f"{sender.url}/v1", api_key=secret, max_retries=0) as client:
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}]
            )
        yield Served(model, sender, answer)
    finally:
        processes.stop_all()


def test_chat_request_end_to_end_on_4_3(served43: Served, node43: rabbitmq43.Node43) -> None:
    assert served43.answer.choices[0].message.content
    queues = {row[0]: row[1:] for row in node43.list_queues("name", "type", "arguments")}
    queue_type, arguments = queues[contract.model_queue(served43.model)]
    assert queue_type == "classic"
    assert "x-max-priority" in arguments


def deprecation_lines(node: rabbitmq43.Node43) -> list[str]:
    return [line for line in node.log_text().splitlines() if "Deprecated features:" in line]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="consumer/worker.py sets its prefetch with basic.qos global=true; fix it, then remove this mark",
)
def test_dispatcher_uses_no_deprecated_global_qos(served43: Served, node43: rabbitmq43.Node43) -> None:
    """No ``Deprecated features: global_qos`` line in the 4.3 node's log once the stack has served."""
    lines = deprecation_lines(node43)
    print("\n".join(["", "deprecation lines in the 4.3 log:", *lines]))
    assert not [line for line in lines if re.search(r"\bglobal_qos\b", line)]
