"""``python -m tools.many_streams``: the sender's memory with thousands of concurrent streaming clients.

Starts a simulator that generates slowly (so every stream stays open for
seconds), a consumer that takes up to ``--inflight`` of them at once (the
rest wait in the broker, as they would on a busy GPU), and a sender; then
opens ``--clients`` streaming requests that each read their answer to the
end, over and over, for ``--seconds``. Prints the sender's resident memory
idle, at its peak and at the end, and how the requests ended. A measurement,
not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

import aio_pika
import aiohttp

import contract
from harness import stack
from harness.tokens import create_token_at
from tools.bench import rss_mb


async def run(args: argparse.Namespace) -> dict[str, object]:
    tag = uuid.uuid4().hex[:6]
    model = f"streams-{tag}"
    log_dir = stack.ROOT / ".run" / "many-streams"
    rabbitmq_url = os.environ.get("RABBITMQ_URL", contract.DEFAULT_RABBITMQ_URL)
    server_url = os.environ.get("DATABASE_URL", stack.DEFAULT_POSTGRES_URL)
    database = f"streams_{tag}"
    database_url = stack.with_database(server_url, database)
    stack.create_database(server_url, database)
    dead_letter = f"{contract.DEAD_LETTER_QUEUE}-streams-{tag}"
    services: list[stack.Service] = []
    try:
        stack.migrate(database_url)
        backend = stack.start_simulator(
            log_dir,
            model=model,
            name=f"simulator-{model}",
            ttft_ms=50,
            itl_ms=args.itl_ms,
            max_num_seqs=args.inflight,
            default_max_tokens=args.tokens,
        )
        services.append(backend)
        services.append(
            stack.start_consumer(
                log_dir,
                model=model,
                vllm_url=backend.url,
                rabbitmq_url=rabbitmq_url,
                name=f"consumer-{model}",
                flow="fixed",
                max_inflight=args.inflight,
                log_level="warning",
                dead_letter_queue=dead_letter,
            )
        )
        sender = stack.start_sender(
            log_dir, database_url=database_url, rabbitmq_url=rabbitmq_url, log_level="warning"
        )
        services.append(sender)
        token = await create_token_at(database_url, f"streams-{tag}", priority=5, threshold=1_000_000)
        await asyncio.sleep(1)
        idle = rss_mb(sender.pid)
        outcomes: dict[str, int] = {}
        peak = idle
        stop_at = time.monotonic() + args.seconds
        body = {"model": model, "prompt": "x", "stream": True}
        headers = {"Authorization": f"Bearer {token}"}
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=600)

        async def client(session: aiohttp.ClientSession, number: int) -> None:
            await asyncio.sleep(number * args.ramp / args.clients)  # a ramp, not a thundering herd
            while time.monotonic() < stop_at:
                try:
                    async with session.post(sender.url + "/v1/completions", json=body, headers=headers) as r:
                        raw = await r.read()
                        ok = r.status == 200 and raw.endswith(b"data: [DONE]\n\n")
                        outcome = "ok" if ok else f"status {r.status}"
                except aiohttp.ClientError as exc:
                    outcome = type(exc).__name__
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        async def sample() -> None:
            nonlocal peak
            while time.monotonic() < stop_at:
                peak = max(peak, rss_mb(sender.pid))
                await asyncio.sleep(0.5)

        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            sampler = asyncio.create_task(sample())
            await asyncio.gather(*(client(session, n) for n in range(args.clients)))
            await sampler
        return {
            "scenario": f"streams-c{args.clients}",
            "consumer_inflight": args.inflight,
            "sender_rss_mb": {
                "idle": round(idle, 1),
                "peak": round(peak, 1),
                "end": round(rss_mb(sender.pid), 1),
            },
            "kb_per_client_at_peak": round((peak - idle) * 1024 / args.clients, 1),
            "requests": outcomes,
        }
    finally:
        for service in reversed(services):
            service.stop()
        connection = await aio_pika.connect(rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(contract.model_queue(model))
            await channel.queue_delete(dead_letter)
        stack.drop_database(server_url, database)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.many_streams", description=__doc__)
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--inflight", type=int, default=1000, help="streams the backend serves at once")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which clients connect")
    parser.add_argument("--itl-ms", type=float, default=200.0)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
