"""Prometheus metrics of the sender and the consumer match the traffic sent through them."""

from __future__ import annotations

import asyncio

import httpx

from harness.api import auth, wait_listed
from harness.observe import scrape, total
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import unique


async def test_counts_and_histograms_match_the_traffic(
    processes: Processes, sender: Service, token: str
) -> None:
    model = unique("metered")
    backend = processes.simulator(model)
    consumer = processes.consumer(model, backend)
    await wait_listed(sender, token, model)
    ok = {"model": model, "prompt": "x", "max_tokens": 3}
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as http:
        statuses = [(await http.post("/v1/completions", json=ok)).status_code for _ in range(3)]
        statuses.append((await http.post("/v1/completions", json={**ok, "stream": True})).status_code)
        streamed_with_usage = {**ok, "stream": True, "stream_options": {"include_usage": True}}
        statuses.append((await http.post("/v1/completions", json=streamed_with_usage)).status_code)
        statuses.append((await http.post("/v1/completions", json={**ok, "max_tokens": 10**6})).status_code)
        statuses.append((await http.post("/v1/completions", json={**ok, "model": "nowhere"})).status_code)
    assert statuses == [200, 200, 200, 200, 200, 400, 404]
    await asyncio.sleep(0.2)  # the consumer records a request just after its answer left

    text, sent = await scrape(sender)
    assert total(sent, "dispatcher_requests_total", model=model, status="200") == 5
    assert total(sent, "dispatcher_requests_total", model=model, status="400") == 1
    assert total(sent, "dispatcher_request_duration_seconds_count", model=model) == 6
    assert total(sent, "dispatcher_time_to_first_byte_seconds_count", model=model) == 6
    assert total(sent, "dispatcher_rejected_requests_total", reason="unknown_model") >= 1
    assert total(sent, "dispatcher_broker_connected") == 1
    assert token not in text

    text, served = await scrape(consumer)
    assert total(served, "consumer_requests_total", model=model, status="200", outcome="answered") == 5
    assert total(served, "consumer_requests_total", model=model, status="400", outcome="answered") == 1
    assert total(served, "consumer_queue_wait_seconds_count", model=model) == 6
    # Usage as the simulator reports it: the consumer asks for it on streams too, asked for or not.
    assert total(served, "consumer_completion_tokens_total", model=model) == 5 * 3
    assert total(served, "consumer_prompt_tokens_total", model=model) == 5 * len(b"x")
    assert total(served, "consumer_backend_healthy", model=model) == 1
    assert total(served, "consumer_consuming", model=model) == 1
    assert total(served, "consumer_flow_window", model=model) >= 1
    async with httpx.AsyncClient() as http:
        assert (await http.get(consumer.url + "/health")).status_code == 200


async def test_metrics_are_on_their_own_port_never_the_api_port(sender: Service, token: str) -> None:
    """The API port is what the ingress routes to; metrics name tokens, so they are not served there."""
    assert sender.metrics_url and sender.metrics_url != sender.url
    async with httpx.AsyncClient() as http:
        for headers in ({}, auth(token)):
            on_api = await http.get(sender.url + "/metrics", headers=headers)
            assert on_api.status_code == 404, on_api.text
            assert on_api.json()["error"]["code"] == "unknown_url"
            assert "dispatcher_" not in on_api.text
        scraped = await http.get(sender.metrics_url + "/metrics")
        assert scraped.status_code == 200 and "dispatcher_requests_in_flight" in scraped.text
        assert (await http.get(sender.metrics_url + "/v1/models")).status_code == 404
        paths = (await http.get(sender.url + "/openapi.json")).json()["paths"]
    assert "/metrics" not in paths
