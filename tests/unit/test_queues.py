"""The queue type follows the broker's version unless a setting fixes it; arguments follow the type."""

from __future__ import annotations

import pytest

from contract import queues
from contract.queues import QueueType


@pytest.mark.parametrize(
    ("version", "expected"),
    [("4.3.6", (4, 3)), (b"3.10.8", (3, 10)), ("4.10.0-rc.1", (4, 10)), ("", None), ("unknown", None)],
)
def test_parse_version(version: object, expected: tuple[int, int] | None) -> None:
    assert queues.parse_version(version) == expected


@pytest.mark.parametrize(
    ("setting", "version", "expected"),
    [
        ("auto", (4, 3), QueueType.QUORUM),
        ("auto", (5, 0), QueueType.QUORUM),
        ("auto", (4, 2), QueueType.CLASSIC),
        ("auto", (3, 10), QueueType.CLASSIC),
        ("auto", None, QueueType.CLASSIC),
        ("classic", (4, 3), QueueType.CLASSIC),
        ("quorum", (3, 13), QueueType.QUORUM),
    ],
)
def test_choose(
    setting: queues.QueueTypeSetting, version: tuple[int, int] | None, expected: QueueType
) -> None:
    assert queues.choose(setting, version) is expected


def test_model_queue_arguments() -> None:
    assert queues.model_queue_arguments(QueueType.CLASSIC, 9) == {"x-max-priority": 29}  # the wire top
    quorum = {"x-queue-type": "quorum", "x-consumer-disconnected-timeout": 5_000}
    assert queues.model_queue_arguments(QueueType.QUORUM, 9) == quorum
    assert queues.model_queue_arguments(QueueType.QUORUM, 31) == quorum
    with pytest.raises(ValueError, match="quorum"):
        queues.model_queue_arguments(QueueType.QUORUM, 32)


def test_per_process_queue_arguments() -> None:
    assert queues.dead_letter_queue_arguments(QueueType.CLASSIC) == {}
    assert queues.dead_letter_queue_arguments(QueueType.QUORUM) == {"x-queue-type": "quorum"}
    assert queues.reply_queue_arguments(QueueType.CLASSIC, 60_000) == {"x-expires": 60_000}
    assert queues.reply_queue_arguments(QueueType.QUORUM, 60_000) == {
        "x-queue-type": "quorum",
        "x-expires": 60_000,
        "x-consumer-disconnected-timeout": queues.REPLY_CONSUMER_DISCONNECTED_TIMEOUT_MS,
    }


def test_a_scale_above_31_stays_classic() -> None:
    assert queues.choose("auto", (4, 3), max_priority=31) is QueueType.QUORUM
    assert queues.choose("auto", (4, 3), max_priority=32) is QueueType.CLASSIC
    assert queues.model_queue_choices(100) == {QueueType.CLASSIC: {"x-max-priority": 100}}
    assert set(queues.model_queue_choices(9)) == {QueueType.CLASSIC, QueueType.QUORUM}
