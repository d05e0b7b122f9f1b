"""The processes a test starts (simulators, real vLLMs, consumers, senders), all stopped at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from harness import stack
from harness.testrun import DATABASE_URLS, DEAD_LETTER_QUEUE, FAST_SIMULATOR, RABBITMQ_URL


class Backend(Protocol):
    """What a consumer needs of its backend: where it answers."""

    @property
    def url(self) -> str: ...


class Processes:
    """Starts processes for tests and stops every one of them at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.services: list[stack.Service] = []
        self.models: set[str] = set()

    def simulator(self, model: str, name: str | None = None, **options: object) -> stack.Service:
        settings = {**FAST_SIMULATOR, **options}
        service = stack.start_simulator(
            self.log_dir, model=model, name=name or f"simulator-{model}", **settings
        )
        self.services.append(service)
        return service

    def vllm_cpu(
        self,
        names: list[str],
        max_num_seqs: int | None = None,
        extra_args: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> stack.Service:
        """A real vLLM (CPU build, already set up) serving the tiny model under ``names``."""
        service = stack.start_vllm_cpu(
            self.log_dir, names=names, max_num_seqs=max_num_seqs, extra_args=extra_args, extra_env=extra_env
        )
        self.services.append(service)
        return service

    def consumer(
        self,
        model: str,
        backend: Backend,
        name: str | None = None,
        rabbitmq_url: str = RABBITMQ_URL,
        **options: object,
    ) -> stack.Service:
        if rabbitmq_url == RABBITMQ_URL:
            self.models.add(model)
        options.setdefault("dead_letter_queue", DEAD_LETTER_QUEUE)
        service = stack.start_consumer(
            self.log_dir,
            model=model,
            vllm_url=backend.url,
            rabbitmq_url=rabbitmq_url,
            name=name or f"consumer-{model}",
            **options,
        )
        self.services.append(service)
        return service

    def one_slot(self, model: str, **consumer_options: Any) -> tuple[stack.Service, stack.Service]:
        """A backend that runs one sequence at a time (5 ms a token) behind a consumer that takes one
        request at a time: everything else waits in the broker, where tests can watch it."""
        backend = self.simulator(model, max_num_seqs=1, ttft_ms=5, itl_ms=5)
        consumer = self.consumer(model, backend, flow="fixed", max_inflight=1, **consumer_options)
        return backend, consumer

    def sender(
        self,
        database: str,
        database_url: str | None = None,
        rabbitmq_url: str = RABBITMQ_URL,
        **options: Any,
    ) -> stack.Service:
        """A sender on this run's database of kind ``database`` (or at ``database_url``)."""
        options.setdefault("max_body_bytes", 1024 * 1024)
        options.setdefault("queue_stats_seconds", 0.02)
        options.setdefault("token_cache_seconds", 1.0)
        # Every test client is 127.0.0.1: one test's 401s must not get the next one refused.
        options.setdefault("auth_failure_limit", 0)
        service = stack.start_sender(
            self.log_dir,
            database_url=database_url or DATABASE_URLS[database],
            rabbitmq_url=rabbitmq_url,
            name=f"sender-{database}-{len(self.services)}",
            **options,
        )
        self.services.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()
