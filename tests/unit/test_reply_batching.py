"""The consumer batches a streamed answer into few reply messages, and marks a broken one."""

from __future__ import annotations

import asyncio

from consumer.replies import ReplyWriter
from consumer.serving import flush_interval
from consumer.settings import ConsumerSettings
from contract import Reply


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
    await writer.feed(b"x" * 2000)  # over max_bytes: sent at once, as two pieces
    await writer.finish()
    assert [r.seq for r in sent] == [0, 1, 2, 3, 4]
    assert all(len(r.body) <= 1000 for r in sent)
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


async def test_a_cut_answer_reports_the_tokens_generated_so_far() -> None:
    from consumer.token_counts import StreamUsage

    writer, sent = collecting_writer()
    watcher = StreamUsage(strip=True)
    writer.count = watcher.so_far
    writer.begin(200, "text/event-stream")
    token = b'data: {"object":"text_completion","choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'
    await writer.feed(watcher.feed(token))
    await writer.feed(watcher.feed(token + token))  # batched: waits for the timer
    # The client went away: what is batched is dropped, the last piece says what was generated.
    await writer.cut("cancelled: the client went away")
    assert [r.seq for r in sent] == [0, 1] and sent[1].last and sent[1].body == b""
    assert (sent[1].prompt_tokens, sent[1].completion_tokens) == (None, 3)
    assert writer.reported == (None, 3)
    await asyncio.sleep(0.08)
    assert len(sent) == 2  # the batch timer sends nothing more


async def test_a_whole_answer_larger_than_a_piece_goes_in_several() -> None:
    writer, sent = collecting_writer()
    writer.usage = (3, 4)
    body = bytes(range(256)) * 10  # 2,560 bytes, max_bytes 1,000
    await writer.whole(200, "application/json", body)
    assert [len(r.body) for r in sent] == [1000, 1000, 560]
    assert b"".join(r.body for r in sent) == body
    assert [r.last for r in sent] == [False, False, True]
    assert sent[0].status == 200 and sent[0].content_type == "application/json"
    assert sent[-1].prompt_tokens == 3 and sent[0].prompt_tokens is None
    exact, pieces = collecting_writer()
    await exact.whole(200, "application/json", b"y" * 1000)
    assert len(pieces) == 1 and pieces[0].last  # exactly one piece's worth: one piece


ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'


async def test_the_first_token_never_waits_for_the_timer_even_after_the_role_event() -> None:
    sent: list[Reply] = []

    async def publish(reply: Reply) -> None:
        sent.append(reply)

    # An hour between batches: anything that waited for the timer would not be sent in this test.
    writer = ReplyWriter(publish, liveness_queue="amq.gen-test", interval=3600, max_bytes=1 << 20)
    writer.begin(200, "text/event-stream")
    await writer.feed(ROLE)
    await writer.feed(TOKEN)
    assert [r.body for r in sent] == [ROLE, TOKEN]  # the role alone did not open the answer
    await writer.feed(TOKEN)
    assert len(sent) == 2  # after the first token, batching resumes
    await writer.finish()
    assert [r.seq for r in sent] == [0, 1, 2] and sent[2].body == TOKEN and sent[2].last


async def test_a_first_read_with_role_and_token_opens_the_answer_in_one_piece() -> None:
    writer, sent = collecting_writer()
    writer.begin(200, "text/event-stream")
    await writer.feed(ROLE + TOKEN)
    await writer.feed(TOKEN)
    assert [r.body for r in sent] == [ROLE + TOKEN]
    writer.abandon()


def test_streams_start_batching_longer_as_more_run_at_once() -> None:
    settings = ConsumerSettings(model="m", flush_interval=0.05, flush_interval_max=0.2, flush_rate=320)
    assert flush_interval(1, settings) == 0.05  # a quiet consumer keeps streams smooth
    assert flush_interval(16, settings) == 0.05
    assert flush_interval(32, settings) == 0.1  # the pieces of all streams stay near 320 a second
    assert flush_interval(64, settings) == 0.2
    assert flush_interval(500, settings) == 0.2  # never beyond the longest interval
