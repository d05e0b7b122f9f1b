"""What tests watch the stack by: a model queue's depth, a backend's running requests, Prometheus samples,
a service's log lines for one request, a token's usage rows."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import httpx
import orjson
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

import contract
from harness.stack import Service
from harness.testrun import RABBITMQ_URL
from sender.tables import usage_table


async def queue_depth(model: str) -> int:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(contract.model_queue(model), passive=True)
        return queue.declaration_result.message_count or 0


async def wait_depth(model: str, depth: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while await queue_depth(model) < depth:
        if time.monotonic() > deadline:
            raise AssertionError(f"queue of {model} never reached {depth}")
        await asyncio.sleep(0.02)


async def wait_running(backend: Service, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            metrics = (await http.get(backend.url + "/metrics")).text
            if any(
                line.startswith("vllm:num_requests_running")
                and not line.endswith(" 0")
                and not line.endswith(" 0.0")
                for line in metrics.splitlines()
            ):
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the blocker never started")


def metrics_url(service: Service) -> str:
    """Where ``service`` serves ``/metrics``: the sender on a port of its own, the others on ``url``."""
    return (service.metrics_url or service.url) + "/metrics"


async def scrape(service: Service) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(metrics_url(service))
    response.raise_for_status()
    text = response.text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def request_lines(service: Service, request_id: str) -> list[dict[str, object]]:
    lines = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        if request_id in line:
            entry = orjson.loads(line)
            if entry.get("request_id") == request_id:
                lines.append(entry)
    return lines


async def usage_rows(engine: AsyncEngine, name: str, count: int) -> list[dict[str, object]]:
    """The token's usage rows, once ``count`` of them are written (batches go out every second)."""
    statement = sa.select(usage_table).where(usage_table.c.token_name == name).order_by(usage_table.c.id)
    for _ in range(150):
        async with engine.connect() as conn:
            rows = [dict(row) for row in (await conn.execute(statement)).mappings()]
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(rows)} usage rows for {name}, expected {count}")
