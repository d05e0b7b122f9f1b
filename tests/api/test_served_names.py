"""Every name a vLLM serves is served: aliases and LoRA adapters, listed and answered, one flow window.

Real processes: a simulator serving a model under an alias and an adapter (listed as vLLM lists
them), one consumer, one sender. The window is checked with the simulator's own peak of requests
running and waiting at once, never with timings.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from harness.api import auth, until_status, wait_listed
from harness.observe import scrape, total
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import RABBITMQ_URL, unique

ROOT = "org/base-model"


def _served(processes: Processes, **consumer_options: str | int) -> tuple[Service, Service, str, str, str]:
    tag = uuid.uuid4().hex[:4]  # each test its own names: the other test's consumer still runs
    model, alias, adapter = unique(f"names{tag}"), unique(f"alias{tag}"), unique(f"course{tag}")
    slow: dict[str, str | int] = {"itl_ms": 20} if consumer_options else {}
    backend = processes.simulator(
        model,
        None,
        aliases=alias,
        root=ROOT,
        lora_modules=f"{adapter}=/adapters/{adapter}",
        allow_runtime_lora_updating="true",
        **slow,
    )
    consumer = processes.consumer(model, backend, None, RABBITMQ_URL, names_interval=0.2, **consumer_options)
    processes.models.update({alias, adapter})  # their queues are deleted at the end of the run
    return backend, consumer, model, alias, adapter


async def _chat(http: httpx.AsyncClient, model: str, max_tokens: int = 3) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    return await http.post("/v1/chat/completions", json=body)


async def test_an_alias_and_an_adapter_are_listed_answered_and_followed(
    processes: Processes, sender: Service, token: str
) -> None:
    backend, _consumer, model, alias, adapter = _served(processes)
    for name in (model, alias, adapter):
        await wait_listed(sender, token, name)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=30) as http:
        listed = {entry["id"]: entry for entry in (await http.get("/v1/models")).json()["data"]}
        assert listed[alias]["root"] == ROOT and listed[alias]["parent"] is None
        assert listed[model]["root"] == ROOT
        assert listed[adapter]["parent"] == model
        assert listed[adapter]["root"] == f"/adapters/{adapter}"
        one = (await http.get(f"/v1/models/{adapter}")).json()
        assert one["parent"] == model
        # As vLLM does, the answer names the adapter, or the first name for an alias.
        for name, answered in ((alias, model), (adapter, adapter)):
            answer = await _chat(http, name)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == answered

        # The operator unloads the adapter: the consumer follows, the name is no longer served.
        async with httpx.AsyncClient(base_url=backend.url) as direct:
            unloaded = await direct.post("/v1/unload_lora_adapter", json={"lora_name": adapter})
            assert unloaded.status_code == 200, unloaded.text
        await wait_listed(sender, token, adapter, listed=False)
        await until_status(sender, token, adapter, 404)
        refused = await _chat(http, adapter)
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "model_not_found"
        assert (await _chat(http, alias)).status_code == 200  # the others are still served

        # Loaded again at run time: served again.
        async with httpx.AsyncClient(base_url=backend.url) as direct:
            loaded = await direct.post(
                "/v1/load_lora_adapter", json={"lora_name": adapter, "lora_path": f"/adapters/{adapter}"}
            )
            assert loaded.status_code == 200, loaded.text
        await wait_listed(sender, token, adapter)
        assert (await _chat(http, adapter)).status_code == 200


@pytest.mark.parametrize("window", [3, 1])
async def test_one_flow_window_bounds_the_backend_across_names(
    processes: Processes, sender: Service, token: str, window: int
) -> None:
    backend, _consumer, model, alias, adapter = _served(processes, flow="fixed", max_inflight=window)
    for name in (model, alias, adapter):
        await wait_listed(sender, token, name)
    names = [model, alias, adapter] * 5
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
        answers = await asyncio.gather(*(_chat(http, name, max_tokens=8) for name in names))
    assert [a.status_code for a in answers] == [200] * len(names), [
        a.text for a in answers if a.status_code != 200
    ]
    assert sorted(a.json()["model"] for a in answers) == sorted([model, model, adapter] * 5)
    _, samples = await scrape(backend)
    peak = total(samples, "simulator:requests_peak")
    # Three queues of five requests each: a window per name would let up to nine in at once. A window
    # of one, smaller than the names, is served only if its one slot moves to wherever requests wait.
    assert 1 <= peak <= window, peak
