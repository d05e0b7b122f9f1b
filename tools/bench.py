"""``make bench``: what the dispatcher costs, measured against the simulator called directly.

Starts a simulator and the stack (sender, consumer) locally, drives both with
the same closed-loop load (``concurrency`` clients, each sending its next
request when the previous one is answered) and prints one JSON line per
scenario, with the direct numbers as the floor and the targets checked.
Timings here are measurements, never test assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import sqlalchemy as sa

import contract
from harness import rabbitmq43, stack
from harness.services import missing_services
from harness.tokens import create_token_at, create_tokens_at
from sender.database import create_engine
from sender.tables import usage_table

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """Outcome of one load run against one target."""

    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    finished: int = 0
    """Answers that arrived within the measured seconds, whenever they were sent: a starved client
    whose requests all take longer than the warm-up still counts what it got."""
    generator_cpu: float = 0.0
    """CPU seconds the load generator (this process) spent on the run, warm-up included."""
    wall: float = 0.0
    """Seconds the run took, warm-up included."""

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def finish_rate(self) -> float:
        return self.finished / self.seconds if self.seconds else 0.0

    def all_latencies(self) -> list[float]:
        return [x for values in self.latencies.values() for x in values]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(percentile(values, q) * 1000, 2) for q in (50, 95, 99)}


async def drive(
    url: str,
    body: Callable[[], tuple[str, dict[str, Any], str]],
    *,
    concurrency: int,
    seconds: float,
    warmup: float,
    stream: bool,
) -> Run:
    """Closed-loop load: ``body()`` gives (label, JSON body, bearer token) for each request."""
    run = Run(seconds=seconds)
    connector = aiohttp.TCPConnector(limit=concurrency * 2, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)
    clock = time.perf_counter  # uvloop's loop.time() has only millisecond resolution
    start = clock()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while clock() < stop_at:
            label, payload, token = body()
            sent = clock()
            first: float | None = None
            try:
                async with session.post(
                    url, json=payload, headers={"Authorization": f"Bearer {token}"}
                ) as response:
                    if stream:
                        async for _ in response.content.iter_any():
                            if first is None:
                                first = clock()
                    else:
                        await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            done = clock()
            if ok and measure_from <= done <= stop_at:
                run.finished += 1
            if sent < measure_from or done > stop_at:
                continue
            if not ok:
                run.errors += 1
                continue
            run.latencies.setdefault(label, []).append(done - sent)
            if first is not None:
                run.ttfts.append(first - sent)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return run


FAIR_HEAVY_CLIENTS = 96
FAIR_LIGHT_TOKENS = 8
FAIR_LIGHT_CLIENTS = 2


def max_min_shares(demand: dict[str, float], capacity: float) -> dict[str, float]:
    """Max-min fair allocation of ``capacity``: a token asking for less than an equal split gets all
    it asks for, and what it leaves is split again among the others (water-filling)."""
    shares: dict[str, float] = {}
    left = dict(demand)
    remaining = capacity
    while left:
        equal = remaining / len(left)
        satisfied = {k: v for k, v in left.items() if v <= equal}
        if not satisfied:
            shares.update({k: equal for k in left})
            break
        for key, value in satisfied.items():
            shares[key] = value
            remaining -= value
            del left[key]
    return shares


def jain(values: dict[str, float]) -> float:
    """Jain's fairness index: 1 when every value is equal, 1/n when one holds everything."""
    xs = list(values.values())
    squares = sum(x * x for x in xs)
    return (sum(xs) ** 2) / (len(xs) * squares) if squares else float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log_dir = stack.ROOT / ".run" / "bench"
        self.rabbitmq_url = os.environ.get("RABBITMQ_URL", contract.DEFAULT_RABBITMQ_URL)
        self.server_url = os.environ.get("DATABASE_URL", stack.DEFAULT_POSTGRES_URL)
        self.services: list[stack.Service] = []
        self.tag = uuid.uuid4().hex[:6]
        # A database of its own, made by the db-init scripts and dropped at the end.
        self.database = f"bench_{self.tag}"
        self.database_url = stack.with_database(self.server_url, self.database)
        self.dead_letter_queue = f"{contract.DEAD_LETTER_QUEUE}-bench-{self.tag}"
        self.results: list[dict[str, Any]] = []

    def emit(self, line: dict[str, Any]) -> None:
        self.results.append(line)
        print(json.dumps(line), flush=True)

    def start_model(
        self, model: str, *, forward_priority: bool = False, **simulator: object
    ) -> stack.Service:
        backend = stack.start_simulator(self.log_dir, model=model, name=f"simulator-{model}", **simulator)
        consumer = stack.start_consumer(
            self.log_dir,
            model=model,
            vllm_url=backend.url,
            rabbitmq_url=self.rabbitmq_url,
            name=f"consumer-{model}",
            max_inflight=512,
            log_level="warning",
            dead_letter_queue=self.dead_letter_queue,
            **({"forward_priority": "true"} if forward_priority else {}),
        )
        self.services += [backend, consumer]
        return backend

    async def wait_listed(self, sender: stack.Service, token: str, model: str) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                async with session.get(
                    sender.url + "/v1/models", headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    if model in [m["id"] for m in (await r.json())["data"]]:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"model {model} never listed")

    async def main(self) -> None:
        model = f"bench-{self.tag}"
        prio_model = f"bench-prio-{self.tag}"
        models = [model, prio_model]
        stack.create_database(self.server_url, self.database)
        try:
            stack.migrate(self.database_url)
            direct = self.start_model(model, ttft_ms=20, itl_ms=10, max_num_seqs=64, default_max_tokens=16)
            prio_direct = self.start_model(
                prio_model, ttft_ms=20, itl_ms=10, max_num_seqs=16, default_max_tokens=64
            )
            sender = stack.start_sender(
                self.log_dir,
                database_url=self.database_url,
                rabbitmq_url=self.rabbitmq_url,
                log_level="warning",
            )
            self.services.append(sender)
            consumer = self.services[1]
            token = await create_token_at(
                self.database_url, f"bench-{self.tag}", priority=5, threshold=100_000
            )
            high = await create_token_at(
                self.database_url, f"bench-high-{self.tag}", priority=9, threshold=100_000
            )
            low = await create_token_at(
                self.database_url, f"bench-low-{self.tag}", priority=1, threshold=100_000
            )
            heavy = await create_token_at(
                self.database_url, f"bench-heavy-{self.tag}", priority=5, threshold=100_000
            )
            heavy_low = await create_token_at(
                self.database_url, f"bench-heavy-low-{self.tag}", priority=4, threshold=100_000
            )
            lights = await create_tokens_at(
                self.database_url,
                [f"bench-light{i}-{self.tag}" for i in range(FAIR_LIGHT_TOKENS)],
                priority=5,
                threshold=100_000,
            )
            await self.wait_listed(sender, token, model)
            await self.wait_listed(sender, token, prio_model)

            chat = {"model": model, "messages": [{"role": "user", "content": "Tell me something."}]}
            for stream, concurrency in [
                (False, 1),
                (False, 16),
                (False, 64),
                (False, 256),
                (True, 16),
                (True, 64),
            ]:
                name = f"{'stream' if stream else 'whole'}-c{concurrency}"
                if self.args.only and name not in self.args.only:
                    continue
                payload = {**chat, "stream": True} if stream else chat
                await self.compare(
                    name,
                    payload,
                    token,
                    concurrency,
                    stream,
                    direct.url,
                    sender.url,
                    [sender.pid, consumer.pid],
                )
                if name == "whole-c1":
                    await self.broker_hop()
            if not self.args.only or "priority" in self.args.only:
                await self.priority(prio_direct.url, sender.url, prio_model, high, low)
            if not self.args.only or "fairness" in self.args.only:
                fair_model, fair_direct = prio_model, prio_direct
                if self.args.fair_backend_priority:
                    # Priority (and the fair-share sub-level) forwarded to a priority-scheduling
                    # backend, as with vLLM --scheduling-policy priority.
                    fair_model = f"bench-fair-{self.tag}"
                    fair_direct = self.start_model(
                        fair_model,
                        forward_priority=True,
                        ttft_ms=20,
                        itl_ms=10,
                        max_num_seqs=16,
                        default_max_tokens=64,
                        scheduling_policy="priority",
                    )
                    models.append(fair_model)
                    await self.wait_listed(sender, token, fair_model)
                await self.fairness(fair_direct.url, sender.url, fair_model, heavy, heavy_low, lights)
            if not self.args.only or "tokens" in self.args.only:
                await self.many_tokens(model, token, sender)
            if not self.args.only or "queue-types" in self.args.only:
                await self.queue_types(token)
        finally:
            for service in reversed(self.services):
                service.stop()
            await self.delete_queues(models)
            stack.drop_database(self.server_url, self.database)
        self.verdict()

    async def hop_round(self) -> float:
        """One round of the broker-hop floor (at the pace of concurrency 1), for interleaving with
        the concurrency-1 runs: its median one-way crossing, in seconds."""
        hops = await self.hop_samples(pause=0.17, count=30)
        return percentile(hops, 50)

    async def hop_samples(self, *, pause: float, count: int) -> list[float]:
        """``count`` bare publish-to-consume crossings of a fresh queue, ``pause`` seconds apart."""
        queue_name = f"bench-hop-{self.tag}-{uuid.uuid4().hex[:4]}"
        sender = await aio_pika.connect(self.rabbitmq_url)
        receiver = await aio_pika.connect(self.rabbitmq_url)
        hops: list[float] = []
        async with sender, receiver:
            out = await sender.channel()
            inbox = await receiver.channel()
            queue = await inbox.declare_queue(
                queue_name, arguments=contract.model_queue_arguments(contract.QueueType.CLASSIC)
            )
            arrived: asyncio.Future[float] | None = None

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                if arrived is not None and not arrived.done():
                    arrived.set_result(time.perf_counter())
                await message.ack()

            consumer_tag = await queue.consume(on_message)
            for _ in range(count):
                arrived = asyncio.get_running_loop().create_future()
                sent = time.perf_counter()
                await out.default_exchange.publish(
                    aio_pika.Message(b"x" * 200, priority=5, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue_name,
                )
                hops.append(await arrived - sent)
                await asyncio.sleep(pause)
            await queue.cancel(consumer_tag)
            await queue.delete(if_unused=False, if_empty=False)
        return hops

    async def broker_hop(self) -> None:
        """The floor under the added latency at concurrency 1: a bare publish to a consume, with no
        dispatcher code around it. A request crosses the broker twice (request, then answer), and
        on a quiet machine each crossing costs more than on a busy one, so both paces are shown."""
        line: dict[str, Any] = {"scenario": "broker-hop"}
        # One request per answer time (as at concurrency 1), then back to back.
        for label, pause, count in (("quiet_ms", 0.17, 60), ("busy_ms", 0.001, 600)):
            line[label] = summary_ms(await self.hop_samples(pause=pause, count=count))
        self.emit(line)

    async def many_tokens(self, model: str, token: str, sender: stack.Service) -> None:
        """1,000 tokens used in turn with usage accounting on, against one cached token without it.

        Both runs hit a sender with the 1,000 tokens in its table; the baseline
        sender has accounting off. Each measured run starts with every token
        looked up once (the single token is cached too). The database's token
        queries are read from the sender's own counter.
        """
        names = [f"bench-many-{self.tag}-{i}" for i in range(1000)]
        secrets_ = await create_tokens_at(self.database_url, names, priority=5, threshold=100_000)
        ttl = 5.0
        baseline = stack.start_sender(
            self.log_dir,
            database_url=self.database_url,
            rabbitmq_url=self.rabbitmq_url,
            name="sender-no-accounting",
            log_level="warning",
            usage_accounting="false",
            token_cache_seconds=str(ttl),
        )
        self.services.append(baseline)
        payload = {"model": model, "messages": [{"role": "user", "content": "Tell me something."}]}
        turn = itertools.cycle(secrets_)

        def one_token() -> tuple[str, dict[str, Any], str]:
            return "all", payload, token

        def many() -> tuple[str, dict[str, Any], str]:
            return "all", payload, next(turn)

        args = self.args

        async def chat_load(url: str, pick: Callable[[], tuple[str, dict[str, Any], str]]) -> Run:
            return await drive(
                url + "/v1/chat/completions",
                pick,
                concurrency=64,
                seconds=args.seconds,
                warmup=args.warmup,
                stream=False,
            )

        single_runs, many_runs, queries = [], [], []
        for _ in range(2):  # alternate, so drift on a shared machine hits both alike
            single_runs.append(await chat_load(baseline.url, one_token))
            # Steady state, as for the single cached token: every token looked up once already.
            await warm_tokens(sender.url, secrets_)
            before = await token_queries(sender.metrics_url)
            many_runs.append(await chat_load(sender.url, many))
            queries.append(await token_queries(sender.metrics_url) - before)
        single_rps = sum(r.throughput for r in single_runs) / len(single_runs)
        many_rps = sum(r.throughput for r in many_runs) / len(many_runs)
        run_seconds = args.seconds + args.warmup
        # "At most one query per token per TTL" over a run: 1,000 tokens, ceil(run / TTL) TTLs.
        allowed = 1000 * math.ceil(run_seconds / ttl)
        self.emit(
            {
                "scenario": "tokens-c64",
                "tokens": 1000,
                "single_cached_token_no_accounting": {
                    "rps": round(single_rps, 1),
                    "runs_rps": [round(r.throughput, 1) for r in single_runs],
                    "latency_ms": summary_ms([x for r in single_runs for x in r.all_latencies()]),
                    "errors": sum(r.errors for r in single_runs),
                },
                "many_tokens_with_accounting": {
                    "rps": round(many_rps, 1),
                    "runs_rps": [round(r.throughput, 1) for r in many_runs],
                    "latency_ms": summary_ms([x for r in many_runs for x in r.all_latencies()]),
                    "errors": sum(r.errors for r in many_runs),
                },
                "throughput_ratio": round(many_rps / single_rps, 3) if single_rps else None,
                "token_db_queries_per_run": queries,
                "token_db_queries_allowed_per_run": allowed,
                "token_cache_seconds": ttl,
                "usage_rows": await count_usage_rows(self.database_url),
            }
        )

    async def queue_types(self, token: str) -> None:
        """Classic queues on one RabbitMQ 4.3 node against quorum queues on a 3-node 4.3 cluster.

        The same simulator, consumer and sender on each, with the queue type fixed: the replicated
        write a quorum queue makes per message (request and every reply piece) is what this shows,
        as added latency at concurrency 1, throughput at 64, and time to the first streamed token.
        """
        try:
            bed = rabbitmq43.Testbed()
        except rabbitmq43.SetupError as exc:
            self.emit(
                {"scenario": "queue-types", "error": f"RabbitMQ {rabbitmq43.SERIES} unavailable: {exc}"}
            )
            return
        lines: dict[str, dict[str, Any]] = {}
        try:
            targets = [
                ("classic-1-node", bed.node().url, "classic"),
                ("quorum-3-nodes", bed.cluster(3)[0].url, "quorum"),
            ]
            for label, url, queue_type in targets:
                model = f"bench-{label}-{self.tag}"
                backend = stack.start_simulator(
                    self.log_dir,
                    model=model,
                    name=f"simulator-{model}",
                    ttft_ms=20,
                    itl_ms=10,
                    max_num_seqs=64,
                    default_max_tokens=16,
                )
                services = [backend]
                try:
                    services.append(
                        stack.start_consumer(
                            self.log_dir,
                            model=model,
                            vllm_url=backend.url,
                            rabbitmq_url=url,
                            name=f"consumer-{model}",
                            max_inflight=512,
                            log_level="warning",
                            queue_type=queue_type,
                        )
                    )
                    sender = stack.start_sender(
                        self.log_dir,
                        database_url=self.database_url,
                        rabbitmq_url=url,
                        name=f"sender-{label}",
                        log_level="warning",
                        queue_type=queue_type,
                    )
                    services.append(sender)
                    await self.wait_listed(sender, token, model)
                    chat = {"model": model, "messages": [{"role": "user", "content": "Tell me something."}]}
                    for stream, concurrency in [(False, 1), (False, 64), (True, 64)]:
                        name = f"{label}-{'stream' if stream else 'whole'}-c{concurrency}"
                        payload = {**chat, "stream": True} if stream else chat
                        await self.compare(
                            name,
                            payload,
                            token,
                            concurrency,
                            stream,
                            backend.url,
                            sender.url,
                            [sender.pid, services[1].pid],
                        )
                        lines[name] = self.results[-1]
                finally:
                    for service in reversed(services):
                        service.stop()
        finally:
            bed.close()
        classic, quorum = "classic-1-node", "quorum-3-nodes"
        self.emit(
            {
                "scenario": "queue-types",
                "quorum_added_latency_ms_p50_c1": round(
                    lines[f"{quorum}-whole-c1"]["added_latency_ms_p50"]
                    - lines[f"{classic}-whole-c1"]["added_latency_ms_p50"],
                    2,
                ),
                "throughput_ratio_c64": {
                    kind: lines[f"{kind}-whole-c64"]["throughput_ratio"] for kind in (classic, quorum)
                },
                "added_ttft_ms_p50_stream_c64": {
                    kind: lines[f"{kind}-stream-c64"]["added_ttft_ms_p50"] for kind in (classic, quorum)
                },
            }
        )

    async def delete_queues(self, models: list[str]) -> None:
        """The model queues are durable: remove this run's, or every run leaves two behind."""
        connection = await aio_pika.connect(self.rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            for model in models:
                await channel.queue_delete(contract.model_queue(model))
            await channel.queue_delete(self.dead_letter_queue)

    async def compare(
        self,
        name: str,
        payload: dict[str, Any],
        token: str,
        concurrency: int,
        stream: bool,
        direct_url: str,
        sender_url: str,
        pids: list[int],
    ) -> None:
        args = self.args
        path = "/v1/chat/completions"

        def body() -> tuple[str, dict[str, Any], str]:
            return "all", payload, token

        # One client gives few samples a second: measure it longer, or its median is mostly noise.
        seconds = max(args.seconds, args.c1_seconds) if concurrency == 1 else args.seconds

        async def measure(url: str) -> Run:
            return await drive(
                url + path,
                body,
                concurrency=concurrency,
                seconds=seconds,
                warmup=args.warmup,
                stream=stream,
            )

        floor = self.hop_round if concurrency == 1 else None
        paired = await alternate(
            lambda: measure(direct_url), lambda: measure(sender_url), args.rounds, pids, floor=floor
        )
        base, through = merged(paired.direct), merged(paired.through)
        answered = paired.answered(seconds + args.warmup, seconds)
        line: dict[str, Any] = {
            "scenario": name,
            "concurrency": concurrency,
            "direct": {
                "rps": round(base.throughput, 1),
                "latency_ms": summary_ms(base.all_latencies()),
                "errors": base.errors,
            },
            "dispatcher": {
                "rps": round(through.throughput, 1),
                "latency_ms": summary_ms(through.all_latencies()),
                "errors": through.errors,
            },
            "added_latency_ms_p50": round(
                (percentile(through.all_latencies(), 50) - percentile(base.all_latencies(), 50)) * 1000, 2
            ),
            "added_latency_ms_p99": round(
                (percentile(through.all_latencies(), 99) - percentile(base.all_latencies(), 99)) * 1000, 2
            ),
            "throughput_ratio": round(through.throughput / base.throughput, 3) if base.throughput else None,
            "cpu_ms_per_request": round(paired.cpu * 1000 / answered, 3) if answered else None,
            "cpu_ms_per_request_by_process": [
                round(cpu * 1000 / answered, 3) if answered else None for cpu in paired.cpu_each
            ],
            "rss_mb": round(sum(rss_mb(pid) for pid in pids), 1),
            **paired.describe(),
        }
        if paired.hops:
            line.update(own_code_line(line["added_latency_ms_p50"], paired.hops))
        if stream:
            line["direct"]["ttft_ms"] = summary_ms(base.ttfts)
            line["dispatcher"]["ttft_ms"] = summary_ms(through.ttfts)
            line["added_ttft_ms_p50"] = round(
                (percentile(through.ttfts, 50) - percentile(base.ttfts, 50)) * 1000, 2
            )
        self.emit(line)

    async def priority(self, direct_url: str, sender_url: str, model: str, high: str, low: str) -> None:
        args = self.args
        path = "/v1/chat/completions"
        payload = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}]}
        rng = random.Random(7)

        def mixed() -> tuple[str, dict[str, Any], str]:
            return ("high", payload, high) if rng.random() < 0.1 else ("low", payload, low)

        def high_only() -> tuple[str, dict[str, Any], str]:
            return "high", payload, high

        unloaded = await drive(
            sender_url + path, high_only, concurrency=1, seconds=args.seconds, warmup=1, stream=False
        )
        fcfs = await drive(
            direct_url + path,
            mixed,
            concurrency=128,
            seconds=args.priority_seconds,
            warmup=args.priority_warmup,
            stream=False,
        )
        through = await drive(
            sender_url + path,
            mixed,
            concurrency=128,
            seconds=args.priority_seconds,
            warmup=args.priority_warmup,
            stream=False,
        )
        high_p50 = percentile(through.latencies.get("high", []), 50)
        unloaded_p50 = percentile(unloaded.all_latencies(), 50)
        low_p99 = percentile(through.latencies.get("low", []), 99)
        fcfs_p99 = percentile(fcfs.all_latencies(), 99)
        self.emit(
            {
                "scenario": "priority-overload-c128",
                "unloaded_high_latency_ms_p50": round(unloaded_p50 * 1000, 1),
                "fcfs_direct": {
                    "rps": round(fcfs.throughput, 1),
                    "latency_ms": summary_ms(fcfs.all_latencies()),
                    "errors": fcfs.errors,
                },
                "dispatcher": {
                    "rps": round(through.throughput, 1),
                    "high_latency_ms": summary_ms(through.latencies.get("high", [])),
                    "low_latency_ms": summary_ms(through.latencies.get("low", [])),
                    "high_requests": len(through.latencies.get("high", [])),
                    "low_requests": len(through.latencies.get("low", [])),
                    "errors": through.errors,
                },
                "high_p50_vs_unloaded": round(high_p50 / unloaded_p50, 2),
                "low_p99_vs_fcfs_p99": round(low_p99 / fcfs_p99, 2),
                "throughput_ratio": round(through.throughput / fcfs.throughput, 3)
                if fcfs.throughput
                else None,
            }
        )

    async def fairness(
        self, direct_url: str, sender_url: str, model: str, heavy: str, heavy_low: str, lights: list[str]
    ) -> None:
        """One heavy token (many clients) and light tokens (two clients each) on a batch-16 model.

        First all at the same priority: each light token should get what it asks for (its median
        latency close to its latency on an idle system) and the heavy one the rest, which
        Jain's index over each token's throughput divided by its max-min fair share measures
        (1.0: every token got exactly its share). Then the heavy token one level lower. The same
        load sent straight to the simulator (first come, first served) gives the throughput floor
        and what the light tokens would see without fair share.
        """
        args = self.args
        payload = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}]}
        url = "/v1/chat/completions"
        idle = await drive(
            sender_url + url,
            lambda: ("light", payload, lights[0]),
            concurrency=FAIR_LIGHT_CLIENTS,
            seconds=args.fair_seconds / 2,
            warmup=1,
            stream=False,
        )
        idle_p50 = percentile(idle.all_latencies(), 50)

        async def mixed(target: str, heavy_token: str) -> dict[str, Run]:
            groups = {"heavy": (heavy_token, FAIR_HEAVY_CLIENTS)}
            groups.update({f"light{i}": (secret, FAIR_LIGHT_CLIENTS) for i, secret in enumerate(lights)})

            def one(label: str, secret: str, clients: int) -> Any:
                return drive(
                    target + url,
                    lambda: (label, payload, secret),
                    concurrency=clients,
                    seconds=args.fair_seconds,
                    warmup=args.fair_warmup,
                    stream=False,
                )

            runs = await asyncio.gather(*(one(label, *group) for label, group in groups.items()))
            return dict(zip(groups, runs, strict=True))

        direct = await mixed(direct_url, heavy)
        direct_rps = sum(run.finish_rate for run in direct.values())
        clients = {label: FAIR_LIGHT_CLIENTS for label in direct if label != "heavy"}
        clients["heavy"] = FAIR_HEAVY_CLIENTS
        # What each token asks for: its clients' requests per second if each were answered at once.
        demand = {label: count / idle_p50 for label, count in clients.items()}
        shares = max_min_shares(demand, direct_rps)
        for scenario, heavy_token in (("fairness-same-priority", heavy), ("fairness-heavy-lower", heavy_low)):
            runs = await mixed(sender_url, heavy_token)
            rps = {label: run.finish_rate for label, run in runs.items()}
            light_p50 = {
                label: percentile(run.all_latencies(), 50) for label, run in runs.items() if label != "heavy"
            }
            direct_light_p50 = [
                percentile(run.all_latencies(), 50) for label, run in direct.items() if label != "heavy"
            ]
            total = sum(rps.values())
            self.emit(
                {
                    "scenario": scenario,
                    "idle_light_latency_ms_p50": round(idle_p50 * 1000, 1),
                    "light_latency_ms_p50": {k: round(v * 1000, 1) for k, v in light_p50.items()},
                    "light_p50_vs_idle_max": round(max(light_p50.values()) / idle_p50, 2),
                    "light_p50_vs_idle_median": round(percentile(list(light_p50.values()), 50) / idle_p50, 2),
                    "fcfs_direct_light_p50_vs_idle_median": round(
                        percentile(direct_light_p50, 50) / idle_p50, 2
                    ),
                    "heavy_latency_ms_p50": round(percentile(runs["heavy"].all_latencies(), 50) * 1000, 1),
                    "rps": {k: round(v, 2) for k, v in rps.items()},
                    "max_min_share_rps": {k: round(v, 2) for k, v in shares.items()},
                    "jain_index": round(jain({k: rps[k] / shares[k] for k in shares if shares[k] > 0}), 3),
                    "total_rps": round(total, 1),
                    "direct_rps": round(direct_rps, 1),
                    "throughput_ratio": round(total / direct_rps, 3) if direct_rps else None,
                    "errors": sum(run.errors for run in runs.values()),
                }
            )

    def verdict(self) -> None:
        by_name = {r["scenario"]: r for r in self.results}
        checks: dict[str, bool] = {}
        if "whole-c1" in by_name:
            checks["added latency c1 p50 <= 3 ms"] = by_name["whole-c1"]["added_latency_ms_p50"] <= 3
            if "own_code_ms_p50" in by_name["whole-c1"]:
                checks["c1 own code <= 1 ms over two broker crossings"] = (
                    by_name["whole-c1"]["own_code_ms_p50"] <= 1
                )
        if "whole-c64" in by_name:
            c64 = by_name["whole-c64"]
            checks["c64 throughput >= 90% of direct"] = c64["throughput_ratio"] >= 0.9
            checks["c64 p99 <= direct + 25 ms"] = c64["added_latency_ms_p99"] <= 25
            checks["c64 memory <= 300 MB"] = c64["rss_mb"] <= 300
        if "stream-c64" in by_name:
            checks["stream c64 ttft p50 <= direct + 4 ms"] = by_name["stream-c64"]["added_ttft_ms_p50"] <= 4
        for name in ("whole-c64", "stream-c64"):
            if name in by_name:
                checks[f"{name} cpu <= 3 ms per request"] = by_name[name]["cpu_ms_per_request"] <= 3
        if "tokens-c64" in by_name:
            t = by_name["tokens-c64"]
            checks["1,000 tokens + accounting >= 95% of one token"] = (t["throughput_ratio"] or 0) >= 0.95
            checks["token lookups <= one per token per TTL"] = all(
                q <= t["token_db_queries_allowed_per_run"] for q in t["token_db_queries_per_run"]
            )
        if "queue-types" in by_name and "error" not in by_name["queue-types"]:
            q = by_name["queue-types"]
            checks["quorum adds <= 2 ms over classic at c1"] = q["quorum_added_latency_ms_p50_c1"] <= 2
            checks["quorum c64 throughput >= 90% of direct"] = (
                q["throughput_ratio_c64"]["quorum-3-nodes"] >= 0.9
            )
        if "priority-overload-c128" in by_name:
            p = by_name["priority-overload-c128"]
            checks["high p50 <= 1.5x unloaded"] = p["high_p50_vs_unloaded"] <= 1.5
            checks["low p99 <= ~2x fcfs"] = p["low_p99_vs_fcfs_p99"] <= 2.2
            checks["overload throughput >= 95% of direct"] = (p["throughput_ratio"] or 0) >= 0.95
            checks["overload zero errors"] = p["dispatcher"]["errors"] == 0
        if "fairness-same-priority" in by_name:
            f = by_name["fairness-same-priority"]
            checks["fairness: light p50 <= 1.5x idle"] = f["light_p50_vs_idle_max"] <= 1.5
            checks["fairness: Jain index >= 0.95"] = f["jain_index"] >= 0.95
            checks["fairness: throughput >= 95% of direct"] = (f["throughput_ratio"] or 0) >= 0.95
        if "fairness-heavy-lower" in by_name:
            f = by_name["fairness-heavy-lower"]
            checks["fairness, heavy lower: light p50 <= 1.5x idle"] = f["light_p50_vs_idle_max"] <= 1.5
        checks.update(streaming_checks(by_name))
        print(json.dumps({"scenario": "targets", "met": all(checks.values()), "checks": checks}), flush=True)


async def generated(run: Callable[[], Awaitable[Run]]) -> Run:
    """``run()``, with the load generator's own CPU and wall time written on the result.

    A generator using most of a core is itself the limit: a reader compares
    ``generator_cores`` of the direct and dispatched runs before blaming the dispatcher.
    """
    cpu, wall = time.process_time(), time.perf_counter()
    result = await run()
    result.generator_cpu = time.process_time() - cpu
    result.wall = time.perf_counter() - wall
    return result


@dataclass
class Paired:
    """Direct and dispatched runs of one scenario, taken in turns so that a noisy moment of a
    shared machine falls on both alike; the dispatcher's CPU is counted over its runs only."""

    direct: list[Run] = field(default_factory=list)
    through: list[Run] = field(default_factory=list)
    cpu_each: list[float] = field(default_factory=list)
    """CPU seconds of each dispatcher process (sender, consumer) over the dispatched runs."""
    hops: list[float] = field(default_factory=list)
    """Median broker crossing of each round, when the floor was measured in turn with the runs."""

    @property
    def cpu(self) -> float:
        """CPU seconds of the sender and consumer together over the dispatched runs."""
        return sum(self.cpu_each)

    def answered(self, run_seconds: float, measured_seconds: float) -> float:
        """Requests answered during the dispatched runs, warm-up included (the CPU covers it too)."""
        return sum(r.requests for r in self.through) * run_seconds / measured_seconds

    def describe(self) -> dict[str, Any]:
        def cores(runs: list[Run]) -> float:
            wall = sum(r.wall for r in runs)
            return round(sum(r.generator_cpu for r in runs) / wall, 3) if wall else 0.0

        def per_request(runs: list[Run]) -> float | None:
            done = sum(r.requests for r in runs)
            return round(sum(r.generator_cpu for r in runs) * 1000 / done, 3) if done else None

        return {
            "rounds": {
                "direct_rps": [round(r.throughput, 1) for r in self.direct],
                "dispatcher_rps": [round(r.throughput, 1) for r in self.through],
            },
            "generator": {
                "direct_cores": cores(self.direct),
                "dispatcher_cores": cores(self.through),
                "direct_cpu_ms_per_request": per_request(self.direct),
                "dispatcher_cpu_ms_per_request": per_request(self.through),
            },
        }


async def alternate(
    direct: Callable[[], Awaitable[Run]],
    through: Callable[[], Awaitable[Run]],
    rounds: int,
    pids: list[int],
    *,
    floor: Callable[[], Awaitable[float]] | None = None,
) -> Paired:
    """``rounds`` turns of (broker floor, if any) direct run, dispatched run."""
    paired = Paired(cpu_each=[0.0] * len(pids))
    for _ in range(max(1, rounds)):
        if floor is not None:
            paired.hops.append(await floor())
        paired.direct.append(await generated(direct))
        before = [cpu_seconds(pid) for pid in pids]
        paired.through.append(await generated(through))
        for index, (pid, start) in enumerate(zip(pids, before, strict=True)):
            paired.cpu_each[index] += cpu_seconds(pid) - start
    return paired


def merged(runs: list[Run]) -> Run:
    """One run made of several: every sample kept, throughput over their summed measured time."""
    total = Run(seconds=sum(r.seconds for r in runs))
    for run in runs:
        for label, values in run.latencies.items():
            total.latencies.setdefault(label, []).extend(values)
        total.ttfts.extend(run.ttfts)
        total.errors += run.errors
        total.finished += run.finished
        total.generator_cpu += run.generator_cpu
        total.wall += run.wall
    return total


def own_code_line(added_p50_ms: float, hops: list[float]) -> dict[str, Any]:
    """What the dispatcher's own code adds at concurrency 1: the added median latency less the two
    broker crossings (request, answer) measured in turn with the runs."""
    hop_ms = percentile(hops, 50) * 1000
    return {
        "broker_hop_ms_p50": round(hop_ms, 3),
        "broker_hop_ms_by_round": [round(h * 1000, 3) for h in hops],
        "own_code_ms_p50": round(added_p50_ms - 2 * hop_ms, 2),
    }


def streaming_checks(by_name: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """The streamed path's targets, with the broker crossing measured in the same run."""
    checks: dict[str, bool] = {}
    hop_ms = by_name.get("whole-c1", {}).get("broker_hop_ms_p50")
    if hop_ms is None and "broker-hop" in by_name:
        hop_ms = by_name["broker-hop"]["quiet_ms"]["p50"]
    stream = by_name.get("stream-c64")
    if stream is not None:
        checks["stream c64 throughput >= 95% of direct"] = (stream["throughput_ratio"] or 0) >= 0.95
        checks["stream c64 cpu <= 2 ms per request"] = (stream["cpu_ms_per_request"] or 99) <= 2
        if hop_ms is not None:
            checks["stream c64 ttft p50 <= direct + two broker crossings + 2 ms"] = (
                stream["added_ttft_ms_p50"] <= 2 * hop_ms + 2
            )
    whole = by_name.get("whole-c64")
    if whole is not None:
        checks["whole c64 throughput >= 95% of direct"] = (whole["throughput_ratio"] or 0) >= 0.95
        checks["whole c64 cpu <= 1.5 ms per request"] = (whole["cpu_ms_per_request"] or 99) <= 1.5
    return checks


async def count_usage_rows(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(usage_table))).scalar_one())
    finally:
        await engine.dispose()


async def warm_tokens(url: str, secrets_: list[str]) -> None:
    """One authenticated ``GET /v1/models`` per token, 64 at a time."""
    pending = iter(secrets_)

    async def client(session: aiohttp.ClientSession) -> None:
        for secret in pending:
            async with session.get(url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}) as r:
                await r.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(64)))


async def token_queries(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("dispatcher_token_queries_total "):
            return int(float(line.split()[1]))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    parser.add_argument(
        "--rounds", type=int, default=2, help="direct and dispatched runs of each scenario, taken in turns"
    )
    parser.add_argument("--c1-seconds", type=float, default=30.0, help="measured seconds at concurrency 1")
    parser.add_argument("--priority-seconds", type=float, default=30.0)
    parser.add_argument("--priority-warmup", type=float, default=8.0)
    parser.add_argument("--fair-seconds", type=float, default=30.0, help="measured seconds per fairness run")
    parser.add_argument("--fair-warmup", type=float, default=10.0)
    parser.add_argument(
        "--fair-backend-priority",
        action="store_true",
        help="fairness on a backend scheduling by the forwarded priority (vLLM --scheduling-policy priority)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        help="scenarios to run (e.g. whole-c64 stream-c64 priority fairness tokens queue-types)",
    )
    args = parser.parse_args()
    problems = missing_services(["RabbitMQ", "PostgreSQL"])
    if problems:
        raise SystemExit("\n".join(problems))
    try:
        import uvloop
    except ImportError:
        asyncio.run(Bench(args).main())
    else:
        uvloop.run(Bench(args).main())


if __name__ == "__main__":
    main()
