"""Start the dispatcher's processes locally: used by ``make run``, the tests and the benchmark.

Each service runs as its own ``python -m`` process, exactly as it would in
production, configured through its environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_MYSQL_URL = "mysql+aiomysql://root@127.0.0.1:3306/test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """One running process of the stack."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    metrics_url: str = ""
    """Where its Prometheus metrics are, if not at ``url``: the sender serves them on a port of its own."""
    group: bool = False
    """The process leads its own process group (it has children), which is signalled as a whole."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> tuple[str, int]:
        """Host and port of ``url``, for tests that speak raw TCP to the service."""
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(5)
        if self.group:
            # Children that outlived their parent (a crashed vLLM's engine) go with it.
            self._signal(signal.SIGKILL)

    def kill(self) -> None:
        if self.process.poll() is None:
            self._signal(signal.SIGKILL)
            self.process.wait(5)

    def _signal(self, signum: int) -> None:
        try:
            if self.group:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)
        except ProcessLookupError:
            pass


def start(name: str, module: str, env: dict[str, str], log_dir: Path, url: str = "") -> Service:
    return start_command(name, [sys.executable, "-m", module], env, log_dir, url=url)


def start_command(
    name: str, argv: list[str], env: dict[str, str], log_dir: Path, url: str = "", group: bool = False
) -> Service:
    """Start any program as a service of the stack (``group``: in its own process group)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=group,
        )
    return Service(name=name, process=process, log_path=log_path, url=url, env=env, group=group)


def start_vllm_cpu(
    log_dir: Path,
    *,
    names: list[str],
    model_dir: Path | None = None,
    name: str = "vllm",
    timeout: float = 300.0,
    max_num_seqs: int | None = None,
    extra_args: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Service:
    """vLLM's CPU build serving ``model_dir`` (default: the tiny model) under ``names``, once healthy.

    ``harness.vllm_cpu.setup()`` must have run first.
    """
    from harness import vllm_cpu

    port = free_port()
    argv, env = vllm_cpu.serve_command(
        model_dir or vllm_cpu.tiny_model_dir(),
        names=names,
        port=port,
        max_num_seqs=max_num_seqs,
        extra_args=extra_args,
    )
    env.update(extra_env or {})
    service = start_command(name, argv, env, log_dir, url=f"http://127.0.0.1:{port}", group=True)
    try:
        wait_http(service, "/health", timeout=timeout)
    except RuntimeError:
        service.stop()
        raise
    vllm_cpu.yield_to_server(service.pid)
    return service


def wait_http(service: Service, path: str, timeout: float = 30.0) -> None:
    """Wait until ``GET service.url + path`` answers 200, or fail with the service's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited early:\n{service.log_tail()}")
        try:
            with urllib.request.urlopen(service.url + path, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{service.name} not ready after {timeout} s:\n{service.log_tail()}")


def start_simulator(log_dir: Path, *, model: str, name: str = "simulator", **options: object) -> Service:
    port = free_port()
    env = {"SIMULATOR_PORT": str(port), "SIMULATOR_MODEL": model}
    env.update({f"SIMULATOR_{key.upper()}": str(value) for key, value in options.items()})
    service = start(name, "simulator", env, log_dir, url=f"http://127.0.0.1:{port}")
    wait_http(service, "/health")
    return service


def start_consumer(
    log_dir: Path, *, model: str, vllm_url: str, rabbitmq_url: str, name: str = "consumer", **options: object
) -> Service:
    status_port = free_port()
    env = {
        "MODEL": model,
        "VLLM_URL": vllm_url,
        "RABBITMQ_URL": rabbitmq_url,
        "CONSUMER_STATUS_HOST": "127.0.0.1",
        "CONSUMER_STATUS_PORT": str(status_port),
    }
    env.update({f"CONSUMER_{key.upper()}": str(value) for key, value in options.items()})
    return start(name, "consumer", env, log_dir, url=f"http://127.0.0.1:{status_port}")


def start_sender(
    log_dir: Path,
    *,
    database_url: str,
    rabbitmq_url: str,
    port: int | None = None,
    name: str = "sender",
    **options: object,
) -> Service:
    port = port or free_port()
    metrics_port = int(str(options.pop("metrics_port", 0))) or free_port()
    env = {
        "DATABASE_URL": database_url,
        "RABBITMQ_URL": rabbitmq_url,
        "SENDER_PORT": str(port),
        "SENDER_METRICS_HOST": "127.0.0.1",
        "SENDER_METRICS_PORT": str(metrics_port),
    }
    env.update({f"SENDER_{key.upper()}": str(value) for key, value in options.items()})
    service = start(name, "sender", env, log_dir, url=f"http://127.0.0.1:{port}")
    service.metrics_url = f"http://127.0.0.1:{metrics_port}"
    wait_http(service, "/health/ready")
    return service


def admin(database_url: str, *args: str, stdin: str | None = None) -> str:
    """Run ``python -m sender.admin`` against ``database_url``; its standard output."""
    result = subprocess.run(
        [sys.executable, "-m", "sender.admin", "--database-url", database_url, *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        input=stdin,
    )
    return result.stdout


def migrate(database_url: str) -> None:
    """Bring the database's schema up to date with the db-init scripts."""
    admin(database_url, "migrate")


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    return url.rsplit("/", 1)[0] + "/" + database


def _server_sql(url: str, statement: str) -> None:
    """Run one statement on the server of ``url`` outside any transaction (CREATE/DROP DATABASE)."""
    from sqlalchemy import create_engine

    sync_url = url.replace("+aiomysql", "+pymysql")
    engine = create_engine(sync_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def create_database(url: str, database: str) -> None:
    _server_sql(url, f"CREATE DATABASE {database}")


def drop_database(url: str, database: str) -> None:
    if url.startswith("postgres"):
        _server_sql(url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    else:
        _server_sql(url, f"DROP DATABASE IF EXISTS {database}")
