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

BLOCKER_TOKENS = 400  # at 5 ms a token, the slot stays busy for ~2 s while the others queue
WAITING_TOKENS = 8
"""Each waiting request holds the slot ~45 ms: answers relayed to their clients a little late on a
busy machine still arrive in the order they were served."""


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
    via: dict[str, Service] | None = None,
) -> list[str]:
    """Occupy the slot, queue ``waiting`` (label, token) one by one, each through ``sender`` or the
    one ``via`` names for its label; labels in finish order."""
    finished: list[str] = []
    # Clients made before the slot is taken: making one costs long enough, on a busy machine, for
    # the blocker to finish before the queue is filled.
    urls = {sender.url, *(service.url for service in (via or {}).values())}
    clients = {url: httpx.AsyncClient(base_url=url, timeout=60) for url in urls}

    async def call(label: str, token: str, tokens: int) -> None:
        http = clients[(via or {}).get(label, sender).url]
        response = await http.post(
            "/v1/completions",
            json={"model": model, "prompt": label, "max_tokens": tokens},
            headers=auth(token),
        )
        assert response.status_code == 200, response.text
        finished.append(label)

    try:
        tasks = [asyncio.create_task(call("blocker", blocker_token, BLOCKER_TOKENS))]
        await wait_running(backend)
        for depth, (label, token) in enumerate(waiting, start=1):
            tasks.append(asyncio.create_task(call(label, token, WAITING_TOKENS)))
            await wait_depth(model, depth)
        await asyncio.gather(*tasks)
    finally:
        for http in clients.values():
            await http.aclose()
    assert finished[0] == "blocker"
    return finished[1:]


async def queue_behind_blocker(
    http: httpx.AsyncClient, model: str, backend: Service, blocker: str, token: str, count: int
) -> list[asyncio.Task[httpx.Response]]:
    """Occupy the slot with a long request of ``blocker``, then queue ``count`` short ones of
    ``token`` one by one; their tasks, the blocker's first."""
    request = {"model": model, "prompt": "x", "max_tokens": 2}
    tasks = [
        asyncio.create_task(
            http.post(
                "/v1/completions", json={**request, "max_tokens": BLOCKER_TOKENS}, headers=auth(blocker)
            )
        )
    ]
    await wait_running(backend)
    for depth in range(1, count + 1):
        tasks.append(asyncio.create_task(http.post("/v1/completions", json=request, headers=auth(token))))
        await wait_depth(model, depth)
    return tasks


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
    # first come, first served among those; the rest of its backlog sank below them (its second
    # request one sub-level, the others to the bottom).
    assert order[:4] == ["heavy0", "light0", "light1", "heavy1"], order
    assert sorted(order[4:]) == ["heavy2", "heavy3", "heavy4", "heavy5"], order


async def test_a_heavy_backlog_spread_over_two_senders_still_sinks(
    processes: Processes, sender: Service, one_slot: tuple[str, Service], tokens: Tokens
) -> None:
    """Each sender replica counts the backlog it published itself: a heavy token whose requests
    alternate between two replicas has half its backlog on each, so the light token overtakes
    all but its first request on each replica (approximately fair, not exactly)."""
    model, backend = one_slot
    other = processes.sender("postgres")
    blocker = await tokens.create("spread-blocker", priority=5)
    heavy = await tokens.create("spread-heavy", priority=5)
    light = await tokens.create("spread-light", priority=5)
    await wait_listed(other, light, model)
    waiting = [(f"heavy{i}", heavy) for i in range(6)] + [("light", light)]
    via = {f"heavy{i}": other for i in range(1, 6, 2)}
    order = await served_order(sender, model, backend, blocker, waiting, via)
    assert sorted(order[:2]) == ["heavy0", "heavy1"], order  # nothing of theirs waited: top
    assert order[2] == "light", order
    assert sorted(order[3:5]) == ["heavy2", "heavy3"], order  # one waited on their replica
    assert sorted(order[5:]) == ["heavy4", "heavy5"], order


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
    assert order[-1] == "low-first", order


async def test_max_parallel_refuses_the_surplus_with_429(
    sender: Service, one_slot: tuple[str, Service], tokens: Tokens
) -> None:
    """Requests queued or running at once, per token: the third of a token allowed two is refused at
    once (not queued), with ``Retry-After``; once its requests ended, it is served again."""
    model, backend = one_slot
    blocker = await tokens.create("parallel-blocker", priority=5)
    capped = await tokens.create("parallel-capped", priority=5, max_parallel=2)
    request = {"model": model, "prompt": "x", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=sender.url, timeout=60) as http:
        held = await queue_behind_blocker(http, model, backend, blocker, capped, 2)
        refused = await http.post("/v1/completions", json=request, headers=auth(capped))
        others = await http.post("/v1/completions", json=request, headers=auth(blocker))
        answers = await asyncio.gather(*held)
        again = await http.post("/v1/completions", json=request, headers=auth(capped))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_parallel_requests"
    assert int(refused.headers["retry-after"]) >= 1
    assert others.status_code == 200  # another token is not limited by this one's cap
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert again.status_code == 200


async def test_a_tokens_threshold_counts_its_own_backlog_not_the_whole_queue(
    sender: Service, one_slot: tuple[str, Service], tokens: Tokens
) -> None:
    """With the default ``SENDER_THRESHOLD_SCOPE=token``, a heavy token's backlog over its threshold
    refuses its own next request, not a light token's whose threshold the whole queue exceeds."""
    model, backend = one_slot
    blocker = await tokens.create("own-blocker", priority=5)
    heavy = await tokens.create("own-heavy", priority=5, threshold=3)
    light = await tokens.create("own-light", priority=5, threshold=3)
    request = {"model": model, "prompt": "x", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=sender.url, timeout=60) as http:
        queued = await queue_behind_blocker(http, model, backend, blocker, heavy, 3)
        refused = await http.post("/v1/completions", json=request, headers=auth(heavy))
        served = await http.post("/v1/completions", json=request, headers=auth(light))
        answers = await asyncio.gather(*queued)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert served.status_code == 200, served.text
    assert [answer.status_code for answer in answers] == [200] * 4
