"""Priority and admission, observed on a backend that serves one request at a time.

With the backend's single slot taken by a long "blocker" request, everything
sent next waits in RabbitMQ; the order in which the waiting requests finish is
then the order the broker handed them out.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import pytest_asyncio

from harness.api import auth, wait_listed
from harness.observe import queue_depth, wait_depth, wait_running
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import Tokens, unique

BLOCKER_TOKENS = 150  # at 5 ms a token, the slot stays busy for ~0.75 s


@pytest.fixture(scope="module")
def slow_model(processes: Processes) -> tuple[str, Service]:
    model = unique("one-slot")
    backend, _ = processes.one_slot(model)
    return model, backend


@pytest_asyncio.fixture(scope="module")
async def priority_tokens(tokens: Tokens) -> dict[int, str]:
    return {p: await tokens.create(f"prio{p}", priority=p, threshold=1000) for p in (1, 2, 5, 8)}


async def served_order(
    sender: Service,
    model: str,
    backend: Service,
    blocker_token: str,
    waiting: list[tuple[str, str, dict[str, str]]],
) -> list[str]:
    """Occupy the slot, queue ``waiting`` (label, token, headers) one by one; labels in finish order."""
    finished: list[str] = []

    async def call(
        http: httpx.AsyncClient, label: str, token: str, headers: dict[str, str], tokens: int
    ) -> None:
        response = await http.post(
            "/v1/completions",
            json={"model": model, "prompt": label, "max_tokens": tokens},
            headers={**auth(token), **headers},
        )
        assert response.status_code == 200, response.text
        finished.append(label)

    async with httpx.AsyncClient(base_url=sender.url, timeout=60) as http:
        tasks = [asyncio.create_task(call(http, "blocker", blocker_token, {}, BLOCKER_TOKENS))]
        await wait_running(backend)
        for depth, (label, token, headers) in enumerate(waiting, start=1):
            tasks.append(asyncio.create_task(call(http, label, token, headers, 2)))
            await wait_depth(model, depth)
        await asyncio.gather(*tasks)
    return finished[1:] if finished[0] == "blocker" else finished


async def test_high_priority_overtakes_queued_low_priority(
    sender: Service, slow_model: tuple[str, Service], priority_tokens: dict[int, str], token: str
) -> None:
    model, backend = slow_model
    await wait_listed(sender, token, model)
    waiting: list[tuple[str, str, dict[str, str]]] = [(f"low{i}", priority_tokens[2], {}) for i in range(4)]
    waiting += [("high", priority_tokens[8], {})]
    order = await served_order(sender, model, backend, priority_tokens[5], waiting)
    assert order == ["high", "low0", "low1", "low2", "low3"]


async def test_x_priority_lowers_but_never_raises(
    sender: Service, slow_model: tuple[str, Service], priority_tokens: dict[int, str], token: str
) -> None:
    model, backend = slow_model
    await wait_listed(sender, token, model)
    waiting = [
        ("lowered", priority_tokens[8], {"X-Priority": "1"}),
        ("normal-a", priority_tokens[5], {}),
        ("raised", priority_tokens[2], {"X-Priority": "9"}),
        ("normal-b", priority_tokens[5], {}),
        ("top", priority_tokens[8], {}),
    ]
    order = await served_order(sender, model, backend, priority_tokens[5], waiting)
    assert order == ["top", "normal-a", "normal-b", "raised", "lowered"]


async def test_threshold_refuses_with_429(
    processes: Processes,
    slow_model: tuple[str, Service],
    priority_tokens: dict[int, str],
    tokens: Tokens,
    token: str,
) -> None:
    """With ``SENDER_THRESHOLD_SCOPE=queue`` a token's threshold is compared with the whole queue:
    other tokens' requests count against it (the default, ``token``, counts only its own:
    ``test_fairness.py``)."""
    model, backend = slow_model
    sender = processes.sender("postgres", threshold_scope="queue")
    await wait_listed(sender, token, model)
    strict = await tokens.create("strict", priority=5, threshold=2)
    request = {"model": model, "prompt": "x", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=sender.url, timeout=60) as http:
        blocker = asyncio.create_task(
            http.post(
                "/v1/completions",
                json={**request, "max_tokens": BLOCKER_TOKENS},
                headers=auth(priority_tokens[5]),
            )
        )
        await wait_running(backend)
        # The queue is empty: the threshold does not bite (this one waits behind the blocker).
        accepted = asyncio.create_task(http.post("/v1/completions", json=request, headers=auth(strict)))
        await wait_depth(model, 1)
        queued = [
            asyncio.create_task(http.post("/v1/completions", json=request, headers=auth(priority_tokens[1])))
            for _ in range(2)
        ]
        await wait_depth(model, 2)
        await asyncio.sleep(0.05)  # let the sender's cached depth catch up
        refused = await http.post("/v1/completions", json=request, headers=auth(strict))
        patient = await http.post("/v1/completions", json=request, headers=auth(priority_tokens[5]))
        await asyncio.gather(blocker, *queued)
    assert (await accepted).status_code == 200
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    assert patient.status_code == 200


async def test_threshold_counts_requests_until_a_consumer_takes_them(
    processes: Processes, tokens: Tokens
) -> None:
    """Between two reads of the queue depth the sender counts its own requests as queued only until
    their first reply. Counting publishes alone, the estimate climbs by the request rate times the
    read interval, and a busy model whose queue stays empty refuses a token whose threshold the
    queue never reached."""
    model = unique("threshold-drift")
    backend = processes.simulator(model, ttft_ms=0, itl_ms=0, max_num_seqs=64)
    processes.consumer(model, backend, flow="fixed", max_inflight=64)
    sender = processes.sender("postgres", queue_stats_seconds=2.0)  # long between two reads
    clients = 8
    # The queue holds at most clients - 1 requests besides the one being admitted: never this many.
    secret = await tokens.create("drift", threshold=clients)
    await wait_listed(sender, secret, model)
    request = {"model": model, "prompt": "x", "max_tokens": 1}
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(secret), timeout=30) as http:

        async def client() -> None:
            for _ in range(40):
                statuses.append((await http.post("/v1/completions", json=request)).status_code)

        await asyncio.gather(*(client() for _ in range(clients)))
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}


async def test_metrics_flow_keeps_the_backlog_in_the_broker(
    processes: Processes, sender: Service, priority_tokens: dict[int, str], token: str
) -> None:
    """With the default flow (vLLM metrics), a consumer in front of a 2-slot backend takes few extra
    requests: a late high-priority request still overtakes most of a low-priority backlog."""
    model = unique("metrics-flow")
    backend = processes.simulator(model, max_num_seqs=2, ttft_ms=5, itl_ms=5)
    processes.consumer(model, backend, max_inflight=64, initial_window=1)
    await wait_listed(sender, token, model)
    finished: list[str] = []

    async def call(http: httpx.AsyncClient, label: str, priority: int) -> None:
        response = await http.post(
            "/v1/completions",
            json={"model": model, "prompt": label, "max_tokens": 20},
            headers=auth(priority_tokens[priority]),
        )
        assert response.status_code == 200
        finished.append(label)

    async with httpx.AsyncClient(base_url=sender.url, timeout=60) as http:
        lows = [asyncio.create_task(call(http, f"low{i}", 1)) for i in range(16)]
        await wait_depth(model, 8)
        high = asyncio.create_task(call(http, "high", 8))
        await asyncio.gather(high, *lows)
    assert finished.index("high") <= 4, finished


async def test_priority_forwarded_to_a_priority_scheduling_backend(
    processes: Processes, sender: Service, priority_tokens: dict[int, str], token: str
) -> None:
    """The consumer holds several requests at once here, so the broker cannot order them: the backend's own
    priority scheduling does, from the ``priority`` field the consumer sets (lower is sooner in vLLM)."""
    model = unique("vllm-priority")
    backend = processes.simulator(model, max_num_seqs=1, ttft_ms=5, itl_ms=5, scheduling_policy="priority")
    processes.consumer(model, backend, flow="fixed", max_inflight=8, forward_priority="true")
    await wait_listed(sender, token, model)
    finished: list[str] = []

    async def call(http: httpx.AsyncClient, label: str, priority: int, tokens: int) -> None:
        response = await http.post(
            "/v1/completions",
            json={"model": model, "prompt": label, "max_tokens": tokens},
            headers=auth(priority_tokens[priority]),
        )
        assert response.status_code == 200, response.text
        finished.append(label)

    async with httpx.AsyncClient(base_url=sender.url, timeout=60) as http:
        tasks = [asyncio.create_task(call(http, "blocker", 5, BLOCKER_TOKENS))]
        await wait_running(backend)
        for i in range(3):
            tasks.append(asyncio.create_task(call(http, f"low{i}", 1, 2)))
        await asyncio.sleep(0.2)  # all taken by the consumer and waiting inside the backend
        assert await queue_depth(model) == 0
        tasks.append(asyncio.create_task(call(http, "high", 8, 2)))
        await asyncio.gather(*tasks)
    assert finished[:2] == ["blocker", "high"], finished
