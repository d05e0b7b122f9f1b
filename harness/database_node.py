"""Private PostgreSQL and MariaDB servers with a TLS listener, for the database TLS tests.

The machine's shared servers are never reconfigured: each node here is a server of its
own, its data, socket and certificates in a temporary directory, on a free port bound to
127.0.0.1, run as the servers' usual OS user (``postgres``, ``mysql``) when started as root.
The certificates come from :func:`harness.broker_node.make_test_certificates` (a CA made on
the spot; the server's certificate names ``localhost`` and ``127.0.0.1``). Each node has
one user, allowed in over TLS only: PostgreSQL's ``pg_hba.conf`` has ``hostssl`` lines and
no ``host`` line, MariaDB's user is created ``REQUIRE SSL``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness.broker_node import make_test_certificates
from harness.services import port_open
from harness.stack import free_port

USER = "dispatch_tls"
PASSWORD = "tls-password-for-tests"
DATABASE = "dispatch_tls"


def _as_user(name: str) -> tuple[int, int] | None:
    """The uid and gid to run a server as: ``name``'s when we are root, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    owner = pwd.getpwnam(name)
    return owner.pw_uid, owner.pw_gid


def _demote(ids: tuple[int, int] | None) -> Callable[[], None] | None:
    if ids is None:
        return None
    uid, gid = ids

    def demote() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return demote


def _chown_tree(directory: Path, ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, *ids)


class _Node:
    os_user = ""

    def __init__(self, prefix: str) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix=prefix))
        self.ids = _as_user(self.os_user)
        self.certificates = make_test_certificates(self.directory / "tls")
        self.certificates["server_key"].chmod(0o600)
        _chown_tree(self.directory, self.ids)
        self._process: subprocess.Popen[bytes] | None = None

    def _run(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.directory,
            preexec_fn=_demote(self.ids),
            **kwargs,  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result  # type: ignore[no-any-return]

    def _spawn(self, args: list[str]) -> None:
        with (self.directory / "server.out").open("ab") as out:
            self._process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=self.directory, preexec_fn=_demote(self.ids)
            )

    def _wait_listening(self, timeout: float, socket: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"{self.os_user} server exited:\n{self.log_tail()}")
            if port_open(self.port) and socket.exists():
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"private {self.os_user} server not listening after {timeout} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()  # both servers shut down cleanly on SIGTERM
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.directory / "server.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class PostgresNode(_Node):
    """A PostgreSQL server with ``ssl=on``; its user logs in with a password over TLS only."""

    os_user = "postgres"

    def __init__(self) -> None:
        super().__init__("dispatch-pg-tls-")
        self.data = self.directory / "data"
        self.socket_dir = self.directory

    def url(self, query: str = "") -> str:
        """``postgresql://`` for the TLS user on 127.0.0.1, with ``query`` (libpq parameters)."""
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}" + (
            f"?{query}" if query else ""
        )

    def start(self, timeout: float = 60.0) -> None:
        password_file = self.directory / "password"
        password_file.write_text(PASSWORD + "\n")
        _chown_tree(self.directory, self.ids)
        self._run(
            ["initdb", "-D", str(self.data), "-U", USER, f"--pwfile={password_file}",
             "--auth-local=trust", "--auth-host=reject", "-E", "UTF8", "--no-sync"]
        )  # fmt: skip
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostssl all all ::1/128 scram-sha-256\n"
        )
        self._spawn(
            ["postgres", "-D", str(self.data), "-p", str(self.port), "-k", str(self.socket_dir),
             "-c", "listen_addresses=127.0.0.1", "-c", "ssl=on",
             "-c", f"ssl_cert_file={self.certificates['server_cert']}",
             "-c", f"ssl_key_file={self.certificates['server_key']}",
             "-c", "fsync=off", "-c", "shared_buffers=16MB", "-c", "max_connections=20"]
        )  # fmt: skip
        self._wait_listening(timeout, self.socket_dir / f".s.PGSQL.{self.port}")
        self._run(["createdb", "-h", str(self.socket_dir), "-p", str(self.port), "-U", USER, DATABASE])


class MariaDBNode(_Node):
    """A MariaDB server with a TLS certificate; its user is created ``REQUIRE SSL``."""

    os_user = "mysql"

    def __init__(self) -> None:
        super().__init__("dispatch-maria-tls-")
        self.data = self.directory / "data"
        self.socket = self.directory / "mysqld.sock"

    def url(self, query: str = "", *, host: str = "127.0.0.1", port: int | None = None) -> str:
        """``mysql://`` for the TLS user, with ``query`` (the TLS parameters of ``sender.database``)."""
        return f"mysql://{USER}:{PASSWORD}@{host}:{port or self.port}/{DATABASE}" + (
            f"?{query}" if query else ""
        )

    def start(self, timeout: float = 60.0) -> None:
        user = ["--user=mysql"] if self.ids is not None else []
        self._run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={self.data}", "--skip-test-db",
             "--auth-root-authentication-method=socket", *user]
        )  # fmt: skip
        self._spawn(
            ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={self.data}", f"--port={self.port}",
             f"--socket={self.socket}", "--bind-address=127.0.0.1", f"--pid-file={self.directory / 'pid'}",
             f"--ssl-ca={self.certificates['ca']}", f"--ssl-cert={self.certificates['server_cert']}",
             f"--ssl-key={self.certificates['server_key']}", "--skip-log-bin",
             "--innodb-buffer-pool-size=16M", "--skip-name-resolve", *user]
        )  # fmt: skip
        self._wait_listening(timeout, self.socket)
        self.sql(
            f"CREATE DATABASE {DATABASE}; "
            f"CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}' REQUIRE SSL; "
            f"GRANT ALL ON {DATABASE}.* TO '{USER}'@'127.0.0.1';"
        )

    def sql(self, statements: str) -> str:
        """Run ``statements`` over the unix socket, as the OS user the server runs as (socket auth)."""
        login = pwd.getpwuid(self.ids[0] if self.ids else os.geteuid()).pw_name
        return self._run(
            ["mariadb", "--no-defaults", f"--socket={self.socket}", "-u", login, "-N", "-e", statements]
        ).stdout
