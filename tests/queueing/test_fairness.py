"""Fair share within a priority level, observed on a backend that serves one request at a time.

With the backend's single slot taken by a long "blocker" request, everything
sent next waits in RabbitMQ; the order in which the waiting requests finish is
then the order the broker handed them out. A token's request is published in a
lower fair-share sub-level the more of its requests already wait
(``contract.demotion_for_backlog``), so a light token's request overtakes a heavy
token's backlog at the same level, never a higher level's.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest_asyncio

from harness.api import auth, wait_listed
from harness.observe import wait_depth, wait_running
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import Tokens, unique

BLOCKER_TOKENS = 150  # at 5 ms a token, the slot stays busy for ~0.75 s


@pytest_asyncio.fixture(scope="module")
async def one_slot(processes: Processes, sender: Service, token: str) -> tuple[str, Service]:
    model = unique("fair-slot")
    backend, _ = processes.one_slot(model)
    await wait_listed(sender, token, model)
    return model, backend


async def served_order(
    sender: Service,
    model: str,
    backend: Service,
    blocker_token: str,
    waiting: list[tuple[str, str]],
) -> list[str]:
    """Occupy the slot, queue ``waiting`` (label, token) one by one; labels in finish order."""
    finished: list[str] = []

    async def call(http: httpx.AsyncClient, label: str, token: str, tokens: int) -> None:
        response = await http.post(
            "/v1/completions",
            json={"model": model, "prompt": label, "max_tokens": tokens},
            headers=auth(token),
        )
        assert response.status_code == 200, response.text
        finished.append(label)

    async with httpx.AsyncClient(base_url=sender.url, timeout=60) as http:
        tasks = [asyncio.create_task(call(http, "blocker", blocker_token, BLOCKER_TOKENS))]
        await wait_running(backend)
        for depth, (label, token) in enumerate(waiting, start=1):
            tasks.append(asyncio.create_task(call(http, label, token, 2)))
            await wait_depth(model, depth)
        await asyncio.gather(*tasks)
    assert finished[0] == "blocker"
    return finished[1:]


async def test_light_tokens_overtake_a_heavy_backlog_at_the_same_level(
    sender: Service, one_slot: tuple[str, Service], tokens: Tokens
) -> None:
    model, backend = one_slot
    blocker = await tokens.create("fair-blocker", priority=5)
    heavy = await tokens.create("fair-heavy", priority=5)
    light = [await tokens.create(f"fair-light{i}", priority=5) for i in range(2)]
    waiting = [(f"heavy{i}", heavy) for i in range(6)]
    waiting += [("light0", light[0]), ("light1", light[1])]
    order = await served_order(sender, model, backend, blocker, waiting)
    # The heavy token's first request waited with nothing ahead of its own, as the lights' did:
    # first come, first served among those; the rest of its backlog sank below them.
    assert order == ["heavy0", "light0", "light1", "heavy1", "heavy2", "heavy3", "heavy4", "heavy5"]


async def test_a_higher_level_still_beats_a_lower_levels_light_token(
    sender: Service, one_slot: tuple[str, Service], tokens: Tokens
) -> None:
    model, backend = one_slot
    blocker = await tokens.create("fair-blocker", priority=5)
    heavy_high = await tokens.create("fair-heavy-high", priority=6)
    light_low = await tokens.create("fair-light-low", priority=5)
    waiting = [("low-first", light_low)]
    waiting += [(f"high{i}", heavy_high) for i in range(5)]
    order = await served_order(sender, model, backend, blocker, waiting)
    assert order == ["high0", "high1", "high2", "high3", "high4", "low-first"]
