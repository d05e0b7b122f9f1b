"""Pure logic: the message contract, the flow window, reply batching and token deadlines."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

import contract
from consumer.flow import BackendLoad, Window, parse_vllm_metrics
from consumer.replies import ReplyWriter
from contract import Announcement, ContractError, Reply, Request, errors
from sender.registry import ModelRegistry
from sender.tokens import Token


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


VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:num_requests_waiting_by_reason{reason="capacity"} 9.0
"""


def test_parse_vllm_metrics() -> None:
    assert parse_vllm_metrics(VLLM_METRICS) == BackendLoad(running=5.0, waiting=1.0, kv_cache=0.5)
    assert parse_vllm_metrics("http_requests_total 3\n") is None


def test_window_grows_while_the_backend_keeps_up_and_shrinks_when_it_queues() -> None:
    window = Window(maximum=100, initial=4, waiting_tolerance=0, kv_cache_max=0.9)
    idle = BackendLoad(running=4, waiting=0, kv_cache=0.1)
    assert window.update(idle, inflight=4) == 8  # slow start doubles
    assert window.update(idle, inflight=3) == 8  # not using it all: no growth
    assert window.update(BackendLoad(running=6, waiting=2, kv_cache=0.2), inflight=8) == 6
    assert window.update(idle, inflight=6) == 7  # after congestion, one at a time
    assert window.update(BackendLoad(running=7, waiting=0, kv_cache=0.95), inflight=7) == 7
    # A full KV cache holds the window even while some of it is in transit: no growth, no shrink.
    assert window.update(BackendLoad(running=5, waiting=0, kv_cache=0.95), inflight=5) == 7
    assert window.update(BackendLoad(running=2, waiting=5, kv_cache=None), inflight=7) == 2
    assert window.update(BackendLoad(running=0, waiting=9, kv_cache=None), inflight=2) == 1
    for _ in range(500):
        window.update(idle, inflight=window.size)
    assert window.size == 100


def collecting_writer() -> tuple[ReplyWriter, list[Reply]]:
    sent: list[Reply] = []

    async def publish(reply: Reply) -> None:
        sent.append(reply)

    return ReplyWriter(publish, liveness_queue="amq.gen-test", interval=0.05, max_bytes=1000), sent


async def test_reply_writer_batches_a_stream() -> None:
    writer, sent = collecting_writer()
    writer.begin(200, "text/event-stream")
    await writer.feed(b"data: 1\n\n")
    assert len(sent) == 1 and sent[0].status == 200  # the first bytes go at once
    for i in range(2, 6):
        await writer.feed(f"data: {i}\n\n".encode())
    assert len(sent) == 1  # the rest wait for the timer
    await asyncio.sleep(0.08)
    assert len(sent) == 2 and sent[1].body.count(b"data:") == 4
    await writer.feed(b"x" * 2000)  # over max_bytes: sent at once
    await writer.finish()
    assert [r.seq for r in sent] == [0, 1, 2, 3]
    assert sent[-1].last and not any(r.last for r in sent[:-1])
    assert all(r.status is None for r in sent[1:])
    assert all(r.liveness_queue == "amq.gen-test" for r in sent)  # every piece names its consumer


async def test_reply_writer_marks_a_broken_stream() -> None:
    writer, sent = collecting_writer()
    writer.begin(200, "text/event-stream")
    await writer.feed(b"data: 1\n\n")
    await writer.feed(b"data: 2\n\n")
    await writer.finish(error="backend went away")
    await writer.finish()  # idempotent
    assert [r.seq for r in sent] == [0, 1]
    assert sent[1].body == b"data: 2\n\n" and sent[1].error == "backend went away" and sent[1].last


def test_usage_is_asked_for_and_stripped_as_vllm_would_not_have_sent_it() -> None:
    from consumer.usage import StreamUsage, ask_for_usage

    payload: dict[str, object] = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert ask_for_usage(payload)
    assert payload["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert not ask_for_usage({"stream": True, "stream_options": {"include_usage": True}})

    # vLLM's chat stream with include_usage: every chunk says "usage":null, a last chunk has the counts.
    head = b'data: {"id":"c","object":"chat.completion.chunk","choices":'
    chunk = head + b'[{"index":0,"delta":{"content":"%s"}}],"usage":null}\n\n'
    usage = head + b'[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
    sent = chunk % b"a" + chunk % b"b" + usage + b"data: [DONE]\n\n"
    expected = (chunk % b"a" + chunk % b"b").replace(b',"usage":null', b"") + b"data: [DONE]\n\n"
    for size in (1, 7, 50, len(sent)):
        watcher = StreamUsage(strip=True)
        out = b"".join(watcher.feed(sent[i : i + size]) for i in range(0, len(sent), size)) + watcher.end()
        assert out == expected and watcher.counts == (7, 2)
    kept = StreamUsage(strip=False)  # the client asked: untouched, still counted
    assert kept.feed(sent) == sent and kept.end() == b"" and kept.counts == (7, 2)

    # Completion chunks carry "usage":null with or without include_usage: it stays.
    text = b'data: {"id":"t","object":"text_completion","choices":[{"text":"a"}],"usage":null}\n\n'
    watcher = StreamUsage(strip=True)
    assert watcher.feed(text + b"data: [DONE]\n\n") == text + b"data: [DONE]\n\n"


def test_stripped_usage_leaves_the_system_fingerprint_where_vllm_puts_it_without_usage() -> None:
    from consumer.usage import StreamUsage

    # vLLM 0.32: with include_usage the fingerprint is on the usage chunk, without it on the last chunk.
    head = b'data: {"id":"t","object":"text_completion","choices":'
    token = head + b'[{"index":0,"text":"a","finish_reason":null}]}\n\n'
    last = head + b'[{"index":0,"text":"b","finish_reason":"length"}]}\n\n'
    usage = head + b'[],"usage":{"prompt_tokens":3,"completion_tokens":2},"system_fingerprint":"vllm-x"}\n\n'
    sent = token + last + usage + b"data: [DONE]\n\n"
    without = token + last[:-3] + b',"system_fingerprint":"vllm-x"}\n\n' + b"data: [DONE]\n\n"
    for size in (1, 9, len(sent)):
        watcher = StreamUsage(strip=True)
        out = b"".join(watcher.feed(sent[i : i + size]) for i in range(0, len(sent), size)) + watcher.end()
        assert out == without and watcher.counts == (3, 2)
    cut_short = StreamUsage(strip=True)  # a stream that ends before its usage chunk loses nothing
    assert cut_short.feed(token + last) + cut_short.end() == token + last


@pytest.mark.parametrize(
    ("max_seconds", "expected"),
    [
        (None, 600.0),
        (60.0, 60.0),
        (0.5, 0.5),
        (900.0, 600.0),
        (600.0, 600.0),
        (0.0, 600.0),
        (float("nan"), 600.0),
    ],
)
def test_a_token_can_shorten_the_deadline_but_never_extend_it(
    max_seconds: float | None, expected: float
) -> None:
    token = Token(name="batch", priority=0, threshold=100, max_seconds=max_seconds)
    assert token.deadline_seconds(600.0) == expected


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


def test_request_timeout_only_shortens_the_deadline() -> None:
    from sender.admission import request_timeout
    from sender.errors import ApiError

    assert request_timeout(None, 600) == 600
    assert request_timeout(" 2.5 ", 600) == 2.5
    assert request_timeout("9999", 600) == 600
    for bad in ("", "x", "0", "-3", "nan", "inf"):
        with pytest.raises(ApiError) as raised:
            request_timeout(bad, 600)
        assert raised.value.status == 400 and raised.value.code == "invalid_request_timeout"


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
    same = Announcement(consumer_id="a", model="m", state="ready", ttl=5.0, max_priority=9)
    other = Announcement(consumer_id="b", model="m", state="ready", ttl=5.0, max_priority=31)
    registry.receive(same.encode())
    assert not caplog.records
    registry.receive(other.encode())
    registry.receive(other.encode())
    errors_logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors_logged) == 1 and "0-31" in errors_logged[0].getMessage()
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
