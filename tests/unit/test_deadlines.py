"""A request's deadline: a token or a header may shorten it, never extend it."""

from __future__ import annotations

import pytest

from sender.tokens import Token


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
