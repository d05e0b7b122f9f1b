"""The message contract: requests, replies and announcements round trip; queue and model names."""

from __future__ import annotations

import time

import orjson
import pytest

import contract
from contract import Announcement, ContractError, Reply, Request, errors
from sender.registry import ModelRegistry


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


def test_the_report_of_a_cut_answer_round_trips_with_its_completion_tokens_alone() -> None:
    # What a consumer sends after the client left: no body, why, and only what it could count.
    report = Reply(seq=3, last=True, error="cancelled: the client went away", completion_tokens=12)
    decoded = Reply.from_amqp(report.headers(), b"", None)
    assert decoded == report and decoded.prompt_tokens is None and decoded.completion_tokens == 12
    assert "prompt-tokens" not in report.headers()


def test_announcement_round_trip() -> None:
    announcement = Announcement("c1", "m", Announcement.READY, 15.0, {"max_model_len": 4096})
    assert Announcement.decode(announcement.encode()) == announcement
    with pytest.raises(ContractError):
        Announcement.decode(b"[]")


def test_queue_names_and_arguments() -> None:
    assert contract.model_queue("org/model") == "dispatch.model.org/model"
    assert contract.model_queue_arguments(contract.QueueType.CLASSIC, 9) == {"x-max-priority": 29}
    assert contract.model_queue_arguments(contract.QueueType.CLASSIC, 3) == {"x-max-priority": 31}


@pytest.mark.parametrize("max_priority", [0, 1, 3, 9, 15, 31])
def test_the_wire_keeps_levels_strict_and_fits_a_quorum_queue(max_priority: int) -> None:
    """Every sub-level of a user level is above every sub-level of the level under it, the wire
    starts at 0 and ends at the classic queue's ``x-max-priority``, which a quorum queue (0-31)
    tells apart whole."""
    sublevels = contract.fairness_sublevels(max_priority)
    wire = [
        [contract.wire_priority(level, demotion, max_priority) for demotion in range(sublevels)]
        for level in range(max_priority + 1)
    ]
    flat = [value for level in wire for value in reversed(level)]
    assert flat == list(range(contract.wire_max_priority(max_priority) + 1))
    assert contract.wire_max_priority(max_priority) <= contract.WIRE_PRIORITY_CEILING
    for level, values in enumerate(wire):
        assert all(contract.user_level(value, max_priority) == level for value in values)
    # Out of range is clamped, never a level above or below the scale.
    top = contract.wire_max_priority(max_priority)
    assert contract.wire_priority(max_priority + 5, -3, max_priority) == top
    assert contract.wire_priority(-1, 99, max_priority) == 0


def test_fair_share_demotes_by_backlog_within_the_level() -> None:
    assert contract.fairness_sublevels(9) == 3
    assert [contract.demotion_for_backlog(b, 9) for b in (0, 1, 2, 3, 50)] == [0, 1, 2, 2, 2]
    assert [contract.demotion_for_backlog(b, 3) for b in (0, 1, 2, 4, 8, 64, 10_000)] == [0, 1, 2, 3, 4, 7, 7]
    assert contract.demotion_for_backlog(100, 31) == 0  # 32 user levels leave no room for sub-levels
    # A light token at the bottom of level 6 still beats a heavy one at the top of level 5.
    assert contract.wire_priority(6, 2, 9) > contract.wire_priority(5, 0, 9)


def test_reply_names_its_consumer() -> None:
    reply = Reply(seq=0, last=False, body=b"x", status=200, liveness_queue="amq.gen-abc")
    decoded = Reply.from_properties(reply.properties("c1"), reply.body)
    assert decoded.liveness_queue == "amq.gen-abc"
    assert Reply.from_amqp(Reply(seq=1, last=True).headers(), b"", None).liveness_queue is None


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


def test_request_message_carries_its_route_and_decodes_back() -> None:
    request = Request(
        path="/v1/completions",
        body=b"{}",
        stream=True,
        priority=4,
        deadline=time.time() + 30,
        request_id="r1",
        correlation_id="c1",
        reply_to="dispatch.reply.x",
    )
    message = request.message()
    assert message.correlation_id == "c1" and message.reply_to == "dispatch.reply.x"
    assert message.priority == 4 and message.delivery_mode == 2 and message.type == "request"
    with pytest.raises(ContractError):
        Request(path="/v1/x", body=b"", stream=False, priority=0, deadline=0, request_id="").message()


def test_cancel_round_trip() -> None:
    message = contract.Cancel("c1", deadline=1700000000.5).message()
    assert message.body == b"c1" and message.headers == {contract.H_DEADLINE: 1700000000500}
    assert message.type == "cancel"
    assert contract.Cancel("c2").message().headers == {}


def test_announcements_carry_the_priority_scale() -> None:
    announcement = Announcement(consumer_id="c", model="m", state="ready", ttl=1.0, max_priority=5)
    assert Announcement.decode(announcement.encode()).max_priority == 5
    legacy = b'{"v": 1, "consumer_id": "c", "model": "m", "state": "ready", "ttl": 1}'
    assert Announcement.decode(legacy).max_priority == contract.DEFAULT_MAX_PRIORITY


def test_a_sender_says_when_a_consumer_uses_another_priority_scale(caplog: pytest.LogCaptureFixture) -> None:
    registry = ModelRegistry(max_priority=9)
    same = Announcement(consumer_id="a", model="m", state="ready", ttl=5.0, max_priority=29)
    # A consumer from before the fair-share sub-levels announced its user scale (9).
    other = Announcement(consumer_id="b", model="m", state="ready", ttl=5.0, max_priority=9)
    registry.receive(same.encode())
    assert not caplog.records
    registry.receive(other.encode())
    registry.receive(other.encode())
    errors_logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors_logged) == 1 and "0-9, this sender publishes 0-29" in errors_logged[0].getMessage()
    assert registry.card("m") is not None  # still listed: the mismatch is the operator's to fix


def test_the_error_catalogue_is_one_table() -> None:
    codes = [kind.code for kind in errors.CATALOGUE.values()]
    assert len(codes) == len(set(codes))
    for kind in errors.CATALOGUE.values():
        body = orjson.loads(kind.body())
        assert body == {
            "error": {"message": kind.message, "type": kind.type, "param": None, "code": kind.code}
        }
        assert kind.reason
    assert errors.reason_of("queue_full") == "threshold" and errors.reason_of("nonsense") == "other"
    event = errors.STREAM_INTERRUPTED.sse_event("cut")
    assert event.startswith(b"data: {") and event.endswith(b"\n\n")
