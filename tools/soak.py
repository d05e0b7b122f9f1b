"""``make soak``: a long run at 80% of capacity with a fault injected every minute.

Runs on a private RabbitMQ node (the broker is restarted as one of the
faults), two simulated backends with a consumer each, and one sender. Every
request is accounted for (see ``harness/traffic.py``); the sender's and the
consumers' memory is sampled throughout. Exits non-zero on any defect (a
request hung, answered twice, cut short without an error, or an undocumented
error) or if memory grew. Off by default: it takes ``--minutes`` (10).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import time
import uuid
from collections.abc import Callable

from harness import stack
from harness.broker_node import BrokerNode
from harness.services import missing_services
from harness.tokens import create_token_at
from harness.traffic import Tally, drive
from tools.bench import rss_mb

TTFT_MS, ITL_MS, SLOTS, TOKENS = 20, 10, 16, 16


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex[:6]
        self.model = f"soak-{self.tag}"
        self.log_dir = stack.ROOT / ".run" / "soak"
        # A database of its own, made by the db-init scripts and dropped at the end.
        self.server_url = os.environ.get("DATABASE_URL", stack.DEFAULT_POSTGRES_URL)
        self.database = f"soak_{self.tag}"
        self.database_url = stack.with_database(self.server_url, self.database)
        self.node = BrokerNode()
        self.backends: list[stack.Service] = []
        self.consumers: list[stack.Service] = []
        self.others: list[stack.Service] = []
        self.generation = 0

    def start_backend(self, index: int, env: dict[str, str] | None = None) -> stack.Service:
        if env is None:
            backend = stack.start_simulator(
                self.log_dir,
                model=self.model,
                name=f"simulator-{self.tag}-{index}",
                ttft_ms=TTFT_MS,
                itl_ms=ITL_MS,
                max_num_seqs=SLOTS,
                default_max_tokens=TOKENS,
            )
        else:  # the same backend coming back on its port
            old = self.backends[index]
            backend = stack.start(old.name, "simulator", env, self.log_dir, url=old.url)
            stack.wait_http(backend, "/health")
        return backend

    def start_consumer(self, index: int) -> stack.Service:
        self.generation += 1
        consumer = stack.start_consumer(
            self.log_dir,
            model=self.model,
            vllm_url=self.backends[index].url,
            rabbitmq_url=self.node.url,
            name=f"consumer-{self.tag}-{index}-{self.generation}",
            max_inflight=SLOTS,
            flow="fixed",
            health_interval=0.5,
            log_level=self.args.log_level,
            dead_letter_queue=f"dispatch.dead-letter-soak-{self.tag}",
        )
        stack.wait_http(consumer, "/health")
        return consumer

    # Faults: each blocks until the system has been put back together.
    def close_connections(self) -> None:
        self.node.close_all_connections()

    def restart_broker(self) -> None:
        self.node.restart_app(down_seconds=3)

    def kill_consumer(self) -> None:
        self.consumers[0].kill()
        self.consumers[0] = self.start_consumer(0)

    def terminate_consumer(self) -> None:
        self.consumers[1].stop()
        self.consumers[1] = self.start_consumer(1)

    def restart_backend(self) -> None:
        old = self.backends[0]
        old.kill()
        time.sleep(2)
        self.backends[0] = self.start_backend(0, env=old.env)

    def hang_backend(self) -> None:
        backend = self.backends[1]
        backend.process.send_signal(signal.SIGSTOP)
        time.sleep(5)
        backend.process.send_signal(signal.SIGCONT)

    def memory(self) -> dict[str, float]:
        return {
            "sender": rss_mb(self.others[0].pid),
            "consumers": sum(rss_mb(c.pid) for c in self.consumers),
        }

    async def run(self) -> bool:
        self.node.start()
        stack.create_database(self.server_url, self.database)
        try:
            stack.migrate(self.database_url)
            for index in range(2):
                self.backends.append(self.start_backend(index))
                self.consumers.append(self.start_consumer(index))
            sender = stack.start_sender(
                self.log_dir,
                database_url=self.database_url,
                rabbitmq_url=self.node.url,
                log_level=self.args.log_level,
            )
            self.others.append(sender)
            token = await create_token_at(
                self.database_url, f"soak-{self.tag}", priority=5, threshold=100_000
            )
            # Closed loop: this many clients keep 80% of the backends' slots busy.
            clients = int(0.8 * SLOTS * len(self.backends))
            return await self.drive(sender, token, clients)
        finally:
            for service in [*self.others, *self.consumers, *self.backends]:
                service.stop()
            self.node.stop()
            stack.drop_database(self.server_url, self.database)

    async def drive(self, sender: stack.Service, token: str, clients: int) -> bool:
        args = self.args
        faults: list[tuple[str, Callable[[], None]]] = [
            ("connections closed", self.close_connections),
            ("consumer SIGKILL", self.kill_consumer),
            ("backend restart", self.restart_backend),
            ("consumer SIGTERM", self.terminate_consumer),
            ("backend hung 5 s", self.hang_backend),
            ("broker restart", self.restart_broker),
        ]
        if args.only:
            faults = [(name, fault) for name, fault in faults if name in args.only]
        tally = Tally()
        stop = asyncio.Event()
        load = asyncio.create_task(
            drive(
                sender.url,
                token,
                self.model,
                clients=clients,
                until=stop,
                tally=tally,
                max_tokens=TOKENS,
                deadline=args.deadline,
            )
        )
        await asyncio.sleep(10)  # warm-up before the first memory sample
        first_memory = self.memory()
        print(f"clients {clients}; memory at start (MB) {first_memory}", flush=True)
        end = time.monotonic() + args.minutes * 60
        for name, fault in itertools.cycle(faults):
            if time.monotonic() + args.fault_every > end:
                break
            await asyncio.sleep(args.fault_every / 2)
            before = tally.total
            await asyncio.to_thread(fault)
            await asyncio.sleep(args.fault_every / 2)
            print(
                f"{name}: {tally.total - before} requests since; total {tally.line()}; "
                f"memory (MB) {self.memory()}",
                flush=True,
            )
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        last_memory = self.memory()
        stop.set()
        await load
        grew = {k: v for k, v in last_memory.items() if v > first_memory[k] * 1.25 + 20}
        print(f"final: {tally.line()}; memory (MB) start {first_memory} end {last_memory}", flush=True)
        for defect in tally.defects[:20]:
            print("defect:", defect, flush=True)
        if grew:
            print(f"memory grew: {grew}", flush=True)
        return not tally.defects and not grew and tally.outcomes["ok"] > 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    parser.add_argument("--deadline", type=float, default=30.0, help="X-Request-Timeout of every request")
    parser.add_argument("--only", nargs="*", help='faults to inject, by name ("backend restart", ...)')
    parser.add_argument("--log-level", default="warning", help="of the sender and the consumers")
    args = parser.parse_args()
    problems = missing_services(["PostgreSQL"])
    if problems:
        raise SystemExit("\n".join(problems))
    ok = asyncio.run(Soak(args).run())
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
