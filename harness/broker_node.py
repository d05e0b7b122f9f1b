"""A private RabbitMQ node for fault-injection tests and the soak run.

Restarting or cutting off a broker that other processes share would break
them, so faults are injected into a node of our own: its own name, ports,
data and log directories (in a temporary directory), started with the
system's ``rabbitmq-server`` and driven with ``rabbitmqctl -n <node>``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from harness.services import port_open
from harness.stack import free_port


class BrokerNode:
    """One RabbitMQ node listening on 127.0.0.1 on a free port."""

    def __init__(self) -> None:
        self.name = f"dispatch-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.directory = Path(tempfile.mkdtemp(prefix="dispatch-broker-"))
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        for sub in ("mnesia", "log"):
            (self.directory / sub).mkdir(exist_ok=True)
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.directory / "rabbitmq-env.conf").write_text("")
        if os.geteuid() == 0:
            # rabbitmq-server drops to the rabbitmq user, which must own its directories.
            try:
                owner = pwd.getpwnam("rabbitmq")
            except KeyError:
                pass
            else:
                for path in [self.directory, *self.directory.rglob("*")]:
                    os.chown(path, owner.pw_uid, owner.pw_gid)
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.directory / "pid"),
        }
        with (self.directory / "server.out").open("ab") as out:
            self._process = subprocess.Popen(
                ["rabbitmq-server"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.directory
            )
        self._wait_listening(timeout)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited:\n{self.log_tail()}")
            if port_open(self.port):
                return
            time.sleep(0.2)
        raise RuntimeError(f"private RabbitMQ not listening after {timeout} s:\n{self.log_tail()}")

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <this node> args...`` and return its output."""
        result = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "fault injection")

    def restart_app(self, down_seconds: float = 0.0) -> None:
        """``stop_app``, a pause, ``start_app``: what a rolling upgrade does to a node."""
        self.ctl("stop_app")
        time.sleep(down_seconds)
        self.ctl("start_app")
        self._wait_listening(60.0)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                self.ctl("stop", timeout=30)
            except (RuntimeError, subprocess.TimeoutExpired):
                self._process.kill()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.directory / "server.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
