"""What admission reserves under a tokens-per-minute limit before the answer is known."""

from __future__ import annotations

from sender.limits import FIRST_GUESS, Ask, estimate


def test_the_estimate_is_the_prompt_by_size_plus_what_may_be_generated_within_the_context() -> None:
    ask = Ask.of("m", {"max_tokens": 50}, body_bytes=400)
    assert ask.max_tokens == 50 and estimate(ask, average=None, max_model_len=None) == 100 + 50
    assert estimate(ask, average=None, max_model_len=120) == 120  # no answer exceeds the context
    chat = Ask.of("m", {"max_completion_tokens": 7}, body_bytes=40)
    assert estimate(chat, average=3.0, max_model_len=None) == 10 + 7
    # Without max_tokens: the token's running average, or a first guess before it has one.
    open_ended = Ask.of("m", {"max_tokens": None}, body_bytes=8)
    assert estimate(open_ended, average=None, max_model_len=None) == 2 + FIRST_GUESS
    assert estimate(open_ended, average=30.2, max_model_len=None) == 2 + 31
    for bad in (-1, "9", True, 2.5):
        assert Ask.of("m", {"max_tokens": bad}, body_bytes=0).max_tokens is None
    assert estimate(Ask.of("m", {"max_tokens": 0}, body_bytes=0), average=None, max_model_len=None) == 1
