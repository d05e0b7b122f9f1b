"""The model list follows consumers as they come and go; both token databases work."""

from __future__ import annotations

import httpx
import openai

from harness.api import auth, wait_listed
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import Tokens, unique


async def test_model_list_follows_consumers(processes: Processes, sender: Service, token: str) -> None:
    model = unique("comes-and-goes")
    request = {"model": model, "prompt": "hi", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http:
        assert (await http.post("/v1/completions", json=request)).status_code == 404

        backend = processes.simulator(model)
        consumer = processes.consumer(model, backend)
        await wait_listed(sender, token, model)
        assert (await http.post("/v1/completions", json=request)).status_code == 200
        assert (await http.get(f"/v1/models/{model}")).status_code == 200

        consumer.stop()
        await wait_listed(sender, token, model, listed=False)
        gone = await http.post("/v1/completions", json=request)
        assert gone.status_code == 503
        assert gone.json()["error"]["code"] == "model_unavailable"
        assert int(gone.headers["retry-after"]) >= 1
        assert (await http.get(f"/v1/models/{model}")).status_code == 404

        processes.consumer(model, backend, name=f"consumer-{model}-again")
        await wait_listed(sender, token, model)
        assert (await http.post("/v1/completions", json=request)).status_code == 200


async def test_killed_consumer_disappears_from_the_list(
    processes: Processes, sender: Service, token: str
) -> None:
    model = unique("killed")
    backend = processes.simulator(model)
    consumer = processes.consumer(model, backend, announce_interval=0.5)
    await wait_listed(sender, token, model)
    consumer.kill()  # no goodbye: the announcement expires
    await wait_listed(sender, token, model, listed=False)


async def test_paused_while_backend_is_down(processes: Processes, sender: Service, token: str) -> None:
    model = unique("backend-down")
    backend = processes.simulator(model)
    processes.consumer(model, backend, health_interval=0.2)
    await wait_listed(sender, token, model)
    backend.stop()
    await wait_listed(sender, token, model, listed=False)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http:
        response = await http.post("/v1/completions", json={"model": model, "prompt": "x"})
    assert response.status_code == 503


async def test_both_databases_authenticate(
    processes: Processes, tokens: Tokens, ready_model: str, sender: Service
) -> None:
    mysql_sender = processes.sender("mysql")
    for database, front in (("postgres", sender), ("mysql", mysql_sender)):
        secret = await tokens.create(f"db-{database}", priority=3, database=database)
        client = openai.AsyncOpenAI(base_url=front.url + "/v1", api_key=secret, max_retries=0)
        completion = await client.completions.create(model=ready_model, prompt="hi", max_tokens=3)
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        models = await client.models.list()
        assert ready_model in [m.id for m in models.data]
        wrong = openai.AsyncOpenAI(base_url=front.url + "/v1", api_key=secret + "x", max_retries=0)
        try:
            await wrong.models.list()
        except openai.AuthenticationError:
            pass
        else:
            raise AssertionError(f"{database}: a wrong token was accepted")
