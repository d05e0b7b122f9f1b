"""The message contract: requests, replies and announcements round trip; queue and model names."""

from __future__ import annotations

import time

import pytest

import contract
from contract import Announcement, ContractError, Reply, Request


def test_request_round_trip() -> None:
    request = Request(
        path="/v1/chat/completions",
        body=b'{"model":"m"}',
        stream=True,
        priority=7,
        deadline=time.time() + 60,
        request_id="abc",
    )
    decoded = Request.from_amqp(request.headers(), request.body, request.priority)
    assert decoded.path == request.path and decoded.stream and decoded.priority == 7
    assert abs(decoded.deadline - request.deadline) < 0.001
    assert 59_000 < request.ttl_ms() <= 60_000


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {},
        {"v": 1},
        {"v": 2, "path": "/x", "deadline": 1},
        {"v": 1, "path": "x", "deadline": 1},
        {"v": 1, "path": "/x", "deadline": "soon"},
    ],
)
def test_malformed_requests_are_refused(headers: dict[str, object] | None) -> None:
    with pytest.raises(ContractError):
        Request.from_amqp(headers, b"{}", 0)


def test_reply_round_trip() -> None:
    reply = Reply(seq=0, last=False, body=b"data: x\n\n", status=200, content_type="text/event-stream")
    assert Reply.from_amqp(reply.headers(), reply.body, reply.content_type) == reply
    with pytest.raises(ContractError):
        Reply.from_amqp({"last": True}, b"", None)


def test_announcement_round_trip() -> None:
    announcement = Announcement("c1", "m", Announcement.READY, 15.0, {"max_model_len": 4096})
    assert Announcement.decode(announcement.encode()) == announcement
    with pytest.raises(ContractError):
        Announcement.decode(b"[]")


def test_queue_names_and_arguments() -> None:
    assert contract.model_queue("org/model") == "dispatch.model.org/model"
    assert contract.model_queue_arguments(9) == {"x-max-priority": 9}


def test_reply_names_its_consumer() -> None:
    reply = Reply(seq=0, last=False, body=b"x", status=200, consumer="amq.gen-abc")
    decoded = Reply.from_amqp(reply.headers(), reply.body, "text/event-stream")
    assert decoded.consumer == "amq.gen-abc"
    assert Reply.from_amqp(Reply(seq=1, last=True).headers(), b"", None).consumer is None


@pytest.mark.parametrize(
    ("model", "servable"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", True),
        ("qwen2.5:7b", True),
        ("\u00e9t\u00e9", False),
        ("a\nb", False),
        ("x" * 300, False),
    ],
)
def test_model_names_that_can_be_queues(model: str, servable: bool) -> None:
    assert contract.servable_model_name(model) is servable
