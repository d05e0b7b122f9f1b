"""The dispatcher on a RabbitMQ 4.3 node: the stack, with its defaults, on a 4.3 node.

A simulator, one consumer and one sender (``harness.processes``, with
``rabbitmq_url`` the 4.3 node's) answer a chat request end to end. With
``queue_type`` ``auto`` the model queue, the dead-letter queue and the sender's
reply queue are quorum queues, the model queue without ``x-max-priority``;
so is the queue of a name the backend serves besides ``MODEL`` (an alias).

No feature 4.3 denies by default is used: no channel-wide (``global``)
``basic.qos`` (the consumer's window is prefetch-one consumers), so the node
logs no ``Deprecated features`` line.
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
from harness.testrun import DEAD_LETTER_QUEUE, Tokens, unique

pytestmark = pytest.mark.timeout(60, func_only=True)


@dataclass
class Served:
    model: str
    alias: str
    sender: Service
    answer: ChatCompletion
    alias_answer: ChatCompletion


@pytest_asyncio.fixture(scope="module")
async def served43(
    services: None, node43: rabbitmq43.Node43, log_dir: Path, tokens: Tokens
) -> AsyncIterator[Served]:
    """Simulator, consumer and sender on the 4.3 node (tokens in this run's database), one chat answered."""
    processes = Processes(log_dir / "broker43")
    model, alias = unique("on-4-3"), unique("alias-4-3")
    try:
        backend = processes.simulator(model, None, aliases=alias)
        processes.consumer(model, backend, rabbitmq_url=node43.url)
        sender = processes.sender("postgres", rabbitmq_url=node43.url)
        secret = await tokens.create("on-4-3")
        await wait_listed(sender, secret, model)
        await wait_listed(sender, secret, alias)
        async with openai.AsyncOpenAI(base_url=f"{sender.url}/v1", api_key=secret, max_retries=0) as client:
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}]
            )
            alias_answer = await client.chat.completions.create(
                model=alias, messages=[{"role": "user", "content": "Hi"}]
            )
        yield Served(model, alias, sender, answer, alias_answer)
    finally:
        processes.stop_all()


def test_chat_request_end_to_end_on_4_3(served43: Served, node43: rabbitmq43.Node43) -> None:
    assert served43.answer.choices[0].message.content
    queues = {row[0]: row[1:] for row in node43.list_queues("name", "type", "arguments")}
    for model in (served43.model, served43.alias):
        queue_type, arguments = queues[contract.model_queue(model)]
        assert queue_type == "quorum", model
        assert "x-max-priority" not in arguments
    assert served43.alias_answer.choices[0].message.content
    assert served43.alias_answer.model == served43.model  # vLLM answers under the primary name
    replies = [row for name, row in queues.items() if name.startswith(contract.REPLY_QUEUE_PREFIX)]
    assert replies and all(row[0] == "quorum" and "x-expires" in row[1] for row in replies)
    assert queues[DEAD_LETTER_QUEUE][0] == "quorum"


def deprecation_lines(node: rabbitmq43.Node43) -> list[str]:
    return [line for line in node.log_text().splitlines() if "Deprecated features:" in line]


def test_dispatcher_uses_no_deprecated_global_qos(served43: Served, node43: rabbitmq43.Node43) -> None:
    """No ``Deprecated features: global_qos`` line in the 4.3 node's log once the stack has served."""
    lines = deprecation_lines(node43)
    print("\n".join(["", "deprecation lines in the 4.3 log:", *lines]))
    assert not [line for line in lines if re.search(r"\bglobal_qos\b", line)]


def test_dispatcher_uses_no_deprecated_feature(served43: Served, node43: rabbitmq43.Node43) -> None:
    """No ``Deprecated features`` line at all (e.g. transient non-exclusive queues) in the node's log."""
    assert deprecation_lines(node43) == []
