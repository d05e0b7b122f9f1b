"""The consumer batches a streamed answer into few reply messages, and marks a broken one."""

from __future__ import annotations

import asyncio

from consumer.replies import ReplyWriter
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
