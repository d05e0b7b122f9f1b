"""A private RabbitMQ node for fault-injection tests and the soak run.

Restarting or cutting off a broker that other processes share would break
them, so faults are injected into a node of our own: its own name, ports,
data and log directories (in a temporary directory), started with the
system's ``rabbitmq-server`` and driven with ``rabbitmqctl -n <node>``.
With ``tls=True`` it also listens for ``amqps://`` on a second port, with a
certificate from a CA made on the spot (:func:`make_test_certificates`); the
security tests add users with the dispatcher's roles (:meth:`BrokerNode.add_user`).
With ``management=True`` it runs the management plugin (the HTTP API KEDA's
``protocol: http`` scaler reads) on 127.0.0.1 at :attr:`BrokerNode.management_url`.
``config`` adds lines to its ``rabbitmq.conf`` (e.g. a small ``max_message_size``).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from contract.broker_roles import TOPIC_EXCHANGE, BrokerRole
from harness.services import port_open
from harness.stack import free_port


class BrokerNode:
    """One RabbitMQ node listening on 127.0.0.1 on a free port."""

    def __init__(self, *, tls: bool = False, management: bool = False, config: str = "") -> None:
        self.name = f"dispatch-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.directory = Path(tempfile.mkdtemp(prefix="dispatch-broker-"))
        self.tls_port = free_port() if tls else 0
        self.certificates: dict[str, Path] = {}
        self.management_port = free_port() if management else 0
        self.management_url = f"http://127.0.0.1:{self.management_port}" if management else ""
        self._extra_config = config
        self._process: subprocess.Popen[bytes] | None = None

    def url_for(self, user: str, password: str, *, tls: bool = False) -> str:
        """The URL of this node for another user; ``tls``: ``amqps://localhost`` on the TLS port."""
        if tls:
            return f"amqps://{user}:{password}@localhost:{self.tls_port}/"
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    def add_user(self, user: str, password: str, role: BrokerRole) -> None:
        """A user of the default virtual host with exactly ``role``'s permissions and tags."""
        self.ctl("add_user", user, password)
        self.ctl("set_permissions", "-p", "/", user, role.configure, role.write, role.read)
        self.ctl("set_topic_permissions", "-p", "/", user, TOPIC_EXCHANGE, role.topic_write, role.topic_read)
        if role.tags:
            self.ctl("set_user_tags", user, *role.tags)

    def start(self, timeout: float = 90.0) -> None:
        for sub in ("mnesia", "log"):
            (self.directory / sub).mkdir(exist_ok=True)
        plugins = "[rabbitmq_management]" if self.management_port else "[]"
        (self.directory / "enabled_plugins").write_text(f"{plugins}.\n")
        config = f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        if self.management_port:
            config += f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
        if self.tls_port:
            self.certificates = make_test_certificates(self.directory / "tls")
            config += (
                f"listeners.ssl.local = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {self.certificates['ca']}\n"
                f"ssl_options.certfile = {self.certificates['server_cert']}\n"
                f"ssl_options.keyfile = {self.certificates['server_key']}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
            )
        if self._extra_config:
            config += self._extra_config.rstrip("\n") + "\n"
        (self.directory / "rabbitmq.conf").write_text(config)
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
            if all(port_open(port) for port in (self.port, self.tls_port, self.management_port) if port):
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

    def channels_of(self, name_prefix: str) -> int:
        """Channels the broker counts on the connections whose ``connection_name`` client property
        starts with ``name_prefix`` (a service may hold several connections), read from the node."""
        output = self.ctl("list_connections", "-q", "--no-table-headers", "client_properties", "channels")
        total = 0
        for line in output.splitlines():
            named = re.search(r'\{"connection_name",(?:"longstr",)?"([^"]*)"\}', line)
            if named and named.group(1).startswith(name_prefix):
                total += int(line.rsplit(maxsplit=1)[-1])
        return total

    def queue_counts(self) -> dict[str, tuple[int, int]]:
        """Every queue of the default virtual host: name -> (ready, unacknowledged) messages."""
        listing = self.ctl("list_queues", "-q", "name", "messages_ready", "messages_unacknowledged")
        counts = {}
        for line in listing.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():  # not the header
                counts[fields[0]] = (int(fields[1]), int(fields[2]))
        return counts

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


def make_test_certificates(directory: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for localhost/127.0.0.1 and a client certificate,
    made with the openssl command line: paths by name (``ca``, ``server_cert``, ``server_key``,
    ``client_cert``, ``client_key``)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        name: directory / file
        for name, file in {
            "ca": "ca.crt",
            "ca_key": "ca.key",
            "server_cert": "server.crt",
            "server_key": "server.key",
            "client_cert": "client.crt",
            "client_key": "client.key",
        }.items()
    }

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *key, "-keyout", str(paths["ca_key"]), "-out", str(paths["ca"]), "-days", "2",
        "-subj", "/CN=dispatch test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for who, subject, usage, san in [
        ("server", "/CN=localhost", "serverAuth", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"),
        ("client", "/CN=dispatch-client", "clientAuth", ""),
    ]:
        csr = directory / f"{who}.csr"
        extensions = directory / f"{who}.ext"
        extensions.write_text(f"{san}extendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
        openssl("req", *key, "-keyout", str(paths[f"{who}_key"]), "-out", str(csr), "-subj", subject)
        openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(paths["ca"]), "-CAkey", str(paths["ca_key"]),
            "-CAcreateserial", "-out", str(paths[f"{who}_cert"]), "-days", "2", "-extfile", str(extensions),
        )  # fmt: skip
    for path in directory.iterdir():
        path.chmod(0o644)  # the broker runs as the rabbitmq user
    return paths
