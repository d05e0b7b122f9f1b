"""The admin CLI and the token rows refuse values the sender could not honour, each with a clear message."""

from __future__ import annotations

import contextlib
import io

import pytest

from sender.admin import parser
from sender.token_records import InvalidTokenField, check_columns


def refusal(*argv: str) -> str:
    """What ``python -m sender.admin`` says when it refuses ``argv`` (before any database is asked)."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(err):
        parser().parse_args(argv)
    assert exited.value.code == 2
    return err.getvalue()


ADD = ("add-token", "--name", "a")
SET = ("set-token", "--name", "a")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((*ADD, "--priority", "12"), "the priority must be an integer from 0 to 9 (SENDER_MAX_PRIORITY"),
        ((*ADD, "--priority", "-3"), "from 0 to 9"),
        ((*ADD, "--priority", "high"), "from 0 to 9"),
        ((*SET, "--priority", "10"), "from 0 to 9"),
        ((*ADD, "--threshold", "-5"), "the threshold must be an integer of at least 1"),
        ((*ADD, "--threshold", "0"), "at least 1"),
        ((*SET, "--threshold", "0"), "at least 1"),
        ((*ADD, "--rpm", "0"), "the limit must be a positive integer per minute, or none"),
        ((*ADD, "--rpm", "-1"), "positive integer"),
        ((*SET, "--tpm", "-100"), "positive integer"),
        ((*ADD, "--tpm", "1.5"), "positive integer"),
        ((*ADD, "--max-seconds", "0"), "max-seconds must be a positive number of seconds"),
        ((*SET, "--max-seconds", "-1"), "positive number"),
        ((*ADD, "--max-seconds", "inf"), "positive number"),
        (
            (*ADD, "--max-parallel", "0"),
            "max-parallel must be a positive integer (requests queued or running",
        ),
        ((*SET, "--max-parallel", "-2"), "max-parallel must be a positive integer"),
        ((*SET, "--max-parallel", "1.5"), "max-parallel must be a positive integer"),
        ((*ADD, "--expires", "next year"), "expected a date (2027-01-01), a date and time"),
        ((*SET, "--expires", "31/12/2027"), "a duration (30d, 12h, 90m, 45s), or none"),
        ((*ADD, "--expires", "30 days"), "30d, 12h"),
        (("usage", "--since", "yesterday"), "expected a date (2027-01-01)"),
    ],
)
def test_bad_cli_input_is_refused_with_the_accepted_values(argv: tuple[str, ...], message: str) -> None:
    said = refusal(*argv)
    assert message in said, said
    assert "Traceback" not in said


def test_the_priority_scale_follows_sender_max_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDER_MAX_PRIORITY", "20")
    assert parser().parse_args([*ADD, "--priority", "12"]).priority == 12
    assert "from 0 to 20" in refusal(*ADD, "--priority", "21")


def test_good_cli_input_is_kept() -> None:
    args = parser().parse_args(
        [
            *ADD,
            "--priority",
            "9",
            "--threshold",
            "1",
            "--rpm",
            "none",
            "--tpm",
            "5",
            "--expires",
            "2027-01-01",
        ]
    )
    assert (args.priority, args.threshold, args.rpm, args.tpm, args.expires) == (9, 1, None, 5, "2027-01-01")
    assert parser().parse_args([*SET, "--expires", "none", "--max-seconds", "0.5"]).max_seconds == 0.5
    assert parser().parse_args([*SET, "--expires", "2027-01-01 12:30"]).expires == "2027-01-01 12:30"


@pytest.mark.parametrize(
    "columns",
    [
        {"priority": -1},
        {"priority": 256},
        {"threshold": 0},
        {"rpm_limit": 0},
        {"tpm_limit": -5},
        {"max_seconds": 0.0},
        {"max_seconds": float("nan")},
    ],
)
def test_rows_refuse_what_the_sender_cannot_honour(columns: dict[str, object]) -> None:
    with pytest.raises(InvalidTokenField, match="must be"):
        check_columns(columns)
