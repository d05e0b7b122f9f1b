"""The sender holds a bounded number of reply bytes per request (no broker needed: the pieces are
handed to the call as the reply consumer would)."""

from __future__ import annotations

import time

import pytest

from contract import Reply
from sender import calls
from sender.calls import Buffered, PendingCall


def call(*, stream: bool, limit: int) -> tuple[PendingCall, Buffered, list[PendingCall]]:
    closed: list[PendingCall] = []
    total = Buffered()
    pending = PendingCall(
        "c" * 32,
        "m",
        time.time() + 30,
        closed.append,
        stream=stream,
        request_id="r-1",
        max_buffered=limit,
        buffered=total,
    )
    return pending, total, closed


async def test_a_stream_nobody_reads_is_stopped_past_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    pending, total, closed = call(stream=True, limit=1000)
    pending.deliver(Reply(seq=0, last=False, body=b"data: x\n\n" * 50, status=200))
    assert total.bytes == 450 and not closed
    first = await pending.next(1)
    assert first.seq == 0 and total.bytes == 0  # read by the client: no longer held
    for seq in range(1, 4):
        pending.deliver(Reply(seq=seq, last=False, body=b"s" * 300))
    assert total.bytes == 900 and not closed
    pending.deliver(Reply(seq=4, last=False, body=b"s" * 300))  # 1,200 > 1,000
    assert pending.overflowed and total.bytes == 0
    assert closed == [pending]  # cancelled at once, not when the client reads on
    pending.deliver(Reply(seq=5, last=True, body=b"late"))  # ignored
    assert total.bytes == 0
    end = await pending.next(1)
    assert end.last and end.error
    pending.close()
    assert closed == [pending]  # closed once
    assert "r-1" in caplog.text and "SENDER_MAX_BUFFERED_REPLY_BYTES" in caplog.text
    assert "ssss" not in caplog.text


async def test_a_whole_answer_in_pieces_is_joined() -> None:
    pending, total, _ = call(stream=False, limit=10_000)
    pending.deliver(Reply(seq=0, last=False, body=b"a" * 1000, status=200, content_type="application/json"))
    pending.deliver(Reply(seq=1, last=False, body=b"b" * 1000))
    pending.deliver(Reply(seq=2, last=True, body=b"c" * 10, prompt_tokens=1, completion_tokens=2))
    first = await pending.next(1)
    whole = await pending.whole(first)
    assert whole.last and whole.status == 200 and whole.content_type == "application/json"
    assert whole.body == b"a" * 1000 + b"b" * 1000 + b"c" * 10
    assert pending.final is not None and pending.final.completion_tokens == 2
    assert total.bytes == 0


async def test_a_whole_answer_larger_than_the_bound_is_refused() -> None:
    pending, total, closed = call(stream=False, limit=2500)
    for seq in range(2):
        pending.deliver(Reply(seq=seq, last=False, body=b"a" * 1000, status=200 if seq == 0 else None))
    first = await pending.next(1)
    whole = pending.whole(first)
    for seq in range(2, 4):
        pending.deliver(Reply(seq=seq, last=False, body=b"a" * 1000))
    result = await whole
    assert result.error and pending.overflowed and closed == [pending]
    assert total.bytes == 0


async def test_a_lost_piece_ends_a_whole_answer() -> None:
    pending, _, _ = call(stream=False, limit=10_000)
    pending.deliver(Reply(seq=0, last=False, body=b"a", status=200))
    pending.deliver(Reply(seq=2, last=True, body=b"c"))
    whole = await pending.whole(await pending.next(1))
    assert whole.error == "reply piece 1 was lost"


async def test_a_piece_delivered_again_is_dropped() -> None:
    """A piece handed over whose ack was lost with the connection comes a second time (redelivered)."""
    pending, total, _ = call(stream=True, limit=10_000)
    owner = "amq.gen-a"
    pending.deliver(Reply(seq=0, last=False, body=b"a", status=200, liveness_queue=owner))
    pending.deliver(Reply(seq=0, last=False, body=b"a", status=200, liveness_queue=owner), again=True)
    pending.deliver(Reply(seq=1, last=True, body=b"b", liveness_queue=owner), again=True)
    assert (await pending.next(1)).seq == 0
    end = await pending.next(1)
    assert end.seq == 1 and end.last and end.error is None
    assert total.bytes == 0


async def test_a_piece_that_comes_after_a_later_one_is_put_back_in_order() -> None:
    """A piece delivered on a connection that dropped comes again on the next subscription, maybe
    after pieces published later."""
    pending, total, _ = call(stream=True, limit=10_000)
    owner = "amq.gen-a"
    pending.deliver(Reply(seq=0, last=False, body=b"a", status=200, liveness_queue=owner))
    assert (await pending.next(1)).seq == 0
    pending.deliver(Reply(seq=2, last=False, body=b"c", liveness_queue=owner))
    pending.deliver(Reply(seq=3, last=True, body=b"d", liveness_queue=owner))
    pending.deliver(Reply(seq=1, last=False, body=b"b", liveness_queue=owner))
    pieces = [await pending.next(1) for _ in range(3)]
    assert [(piece.seq, piece.body, piece.error) for piece in pieces] == [
        (1, b"b", None),
        (2, b"c", None),
        (3, b"d", None),
    ]
    assert pending.finished and total.bytes == 0


async def test_a_piece_that_never_comes_ends_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "REORDER_WAIT", 0.01)
    pending, total, _ = call(stream=True, limit=10_000)
    owner = "amq.gen-a"
    pending.deliver(Reply(seq=0, last=False, body=b"a", status=200, liveness_queue=owner))
    pending.deliver(Reply(seq=2, last=True, body=b"c", liveness_queue=owner))
    assert (await pending.next(30)).seq == 0
    end = await pending.next(30)
    assert end.last and end.error == "reply piece 1 was lost"
    assert total.bytes == 0


async def test_a_piece_served_anew_by_the_same_consumer_ends_the_answer() -> None:
    """Not redelivered but sent again (its consumer served the request a second time): the two
    answers cannot be joined."""
    pending, _, _ = call(stream=True, limit=10_000)
    owner = "amq.gen-a"
    pending.deliver(Reply(seq=0, last=False, body=b"a", status=200, liveness_queue=owner))
    pending.deliver(Reply(seq=1, last=False, body=b"b", liveness_queue=owner))
    pending.deliver(Reply(seq=0, last=False, body=b"A", status=200, liveness_queue=owner))
    assert [(await pending.next(1)).seq for _ in range(2)] == [0, 1]
    end = await pending.next(1)
    assert end.last and end.error == "reply piece 2 was lost"


async def test_the_end_made_here_follows_what_arrived_before_it() -> None:
    """The consumer's connection is gone: the pieces that arrived before are relayed, then the error."""
    pending, _, _ = call(stream=True, limit=10_000)
    owner = "amq.gen-a"
    pending.deliver(Reply(seq=0, last=False, body=b"a", status=200, liveness_queue=owner))
    assert (await pending.next(1)).seq == 0
    pending.deliver(Reply(seq=1, last=False, body=b"b", liveness_queue=owner))
    pending.consumer_gone()
    pending.deliver(Reply(seq=2, last=False, body=b"c", liveness_queue=owner))
    assert (await pending.next(1)).body == b"b"
    end = await pending.next(1)
    assert end.last and end.error == "the model server stopped in the middle of the answer"
