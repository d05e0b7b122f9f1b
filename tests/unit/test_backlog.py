"""The sender's own count of each token's requests: what fair share, max_parallel and Retry-After read."""

from __future__ import annotations

from sender.backlog import Backlog, expected_wait


def test_waiting_until_started_in_flight_until_ended() -> None:
    backlog = Backlog()
    for _ in range(3):
        backlog.published("m", "heavy")
    backlog.published("other", "heavy")
    assert backlog.waiting("m", "heavy") == 3 and backlog.waiting("other", "heavy") == 1
    assert backlog.in_flight("heavy") == 4  # over every model
    backlog.started("m", "heavy")
    assert backlog.waiting("m", "heavy") == 2 and backlog.in_flight("heavy") == 4
    backlog.ended("m", "heavy", started=True)
    assert backlog.waiting("m", "heavy") == 2 and backlog.in_flight("heavy") == 3
    backlog.ended("m", "heavy", started=False)  # cancelled while it waited
    assert backlog.waiting("m", "heavy") == 1 and backlog.in_flight("heavy") == 2
    assert backlog.waiting("m", "light") == 0 and backlog.in_flight("light") == 0
    assert backlog.start_rate("m", "heavy") > 0 and backlog.start_rate("m", "light") == 0
    assert backlog.end_rate("heavy") > 0


def test_idle_keys_are_forgotten_when_the_tables_grow() -> None:
    backlog = Backlog(max_keys=10)
    for i in range(30):
        backlog.published("m", f"t{i}")
        backlog.started("m", f"t{i}")
        backlog.ended("m", f"t{i}", started=True)
    backlog.published("m", "busy")
    backlog.published("m", "last")
    assert backlog.waiting("m", "busy") == 1 and backlog.in_flight("busy") == 1
    assert len(backlog._by_model) <= 12 and len(backlog._by_token) <= 12


def test_expected_wait_is_the_backlog_over_the_rate_within_bounds() -> None:
    assert expected_wait(10, 2.0, floor=1, ceiling=60) == 5
    assert expected_wait(1, 4.0, floor=1, ceiling=60) == 1
    assert expected_wait(1000, 1.0, floor=1, ceiling=60) == 60
    assert expected_wait(5, 0.0, floor=2, ceiling=60) == 2  # nothing known of the rate
