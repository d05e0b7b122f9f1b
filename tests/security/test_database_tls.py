"""TLS to the token database, proved on private servers with a TLS listener and a test CA.

Each server (``harness/database_node.py``) has one user allowed in over TLS only. The
engine is built by the sender's own code (``sender.database.create_engine``, as the
sender, the admin command and the tools build theirs), and the admin command migrates
and adds a token through the same URL. A verified connection works with the test CA;
without a CA, with another CA, or (MariaDB) through a man in the middle that hides the
server's TLS capability, no connection is made and no credential is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from harness import stack
from harness.broker_node import make_test_certificates
from harness.database_node import MariaDBNode, PostgresNode
from sender.database import create_engine


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresNode]:
    node = PostgresNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def mariadb() -> Iterator[MariaDBNode]:
    node = MariaDBNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the servers' certificates."""
    return make_test_certificates(tmp_path_factory.mktemp("other-ca"))["ca"]


async def scalar(url: str, query: str) -> object:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(sa.text(query))).scalar()
    finally:
        await engine.dispose()


def chain(error: BaseException) -> str:
    """The error and every error that caused it (aiomysql reports a failed handshake as error 2003)."""
    causes: list[str] = []
    current: BaseException | None = error
    while current is not None and len(causes) < 10:
        causes.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return "\n".join(causes)


def admin_fails(url: str, *args: str) -> str:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        stack.admin(url, *args)
    return str(failed.value.stderr)


# -- PostgreSQL: libpq's parameters in the URL, passed through to psycopg ----------------------


async def test_postgres_verify_full_with_the_ca_connects_over_tls(postgres: PostgresNode) -> None:
    url = postgres.url(f"sslmode=verify-full&sslrootcert={postgres.certificates['ca']}")
    assert await scalar(url, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    # the admin command builds its engine the same way: the schema and a token, over TLS
    assert "schema version" in stack.admin(url, "migrate")
    stack.admin(url, "add-token", "--name", "tls-alice", "--priority", "5", "--threshold", "10")
    assert await scalar(url, "SELECT count(*) FROM tokens WHERE name = 'tls-alice'") == 1


async def test_postgres_verify_full_without_the_ca_fails(postgres: PostgresNode) -> None:
    # libpq then looks for ~/.postgresql/root.crt; no CA, no connection
    with pytest.raises(sa.exc.OperationalError, match="root certificate file"):
        await scalar(postgres.url("sslmode=verify-full&sslrootcert=/nonexistent/ca.crt"), "SELECT 1")


async def test_postgres_verify_full_with_another_ca_fails(postgres: PostgresNode, other_ca: Path) -> None:
    url = postgres.url(f"sslmode=verify-full&sslrootcert={other_ca}")
    with pytest.raises(sa.exc.OperationalError, match="certificate verify failed"):
        await scalar(url, "SELECT 1")
    assert "certificate verify failed" in admin_fails(url, "schema-version")


async def test_postgres_user_is_refused_without_tls(postgres: PostgresNode) -> None:
    with pytest.raises(sa.exc.OperationalError, match=r"no pg_hba\.conf entry"):
        await scalar(postgres.url("sslmode=disable"), "SELECT 1")


# -- MariaDB: ssl_* parameters in the URL, made into an SSLContext by sender/database.py -------


async def test_mariadb_with_the_ca_connects_verified_over_tls(mariadb: MariaDBNode) -> None:
    url = mariadb.url(f"ssl_ca={mariadb.certificates['ca']}")
    cipher = await scalar(
        url, "SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'Ssl_cipher'"
    )
    assert cipher
    assert "schema version" in stack.admin(url, "migrate")
    stack.admin(url, "add-token", "--name", "tls-bob", "--priority", "5", "--threshold", "10")
    assert await scalar(url, "SELECT count(*) FROM tokens WHERE name = 'tls-bob'") == 1
    # by its name too (the certificate names localhost), and with a client certificate
    client = f"&ssl_cert={mariadb.certificates['client_cert']}&ssl_key={mariadb.certificates['client_key']}"
    assert (
        await scalar(
            mariadb.url(f"ssl_ca={mariadb.certificates['ca']}{client}", host="localhost"), "SELECT 1"
        )
        == 1
    )


async def test_mariadb_without_tls_is_refused_by_the_server(mariadb: MariaDBNode) -> None:
    with pytest.raises(sa.exc.OperationalError, match="Access denied"):
        await scalar(mariadb.url(), "SELECT 1")


async def test_mariadb_without_the_ca_fails(mariadb: MariaDBNode, other_ca: Path) -> None:
    # ssl=true: the system's CAs, which do not know the test CA; then a CA that did not sign it
    for url in (mariadb.url("ssl=true"), mariadb.url(f"ssl_ca={other_ca}")):
        with pytest.raises(sa.exc.OperationalError) as failed:
            await scalar(url, "SELECT 1")
        assert "SSLCertVerificationError" in chain(failed.value)
    assert "CERTIFICATE_VERIFY_FAILED" in admin_fails(mariadb.url(f"ssl_ca={other_ca}"), "schema-version")


@contextlib.asynccontextmanager
async def tls_stripping_proxy(port: int) -> AsyncIterator[int]:
    """A man in the middle clearing the SSL capability of the server's greeting; its port."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
        header = await server_reader.readexactly(4)
        greeting = bytearray(await server_reader.readexactly(int.from_bytes(header[:3], "little")))
        flags_at = greeting.index(0, 1) + 1 + 4 + 8 + 1  # version string, thread id, scramble, filler
        greeting[flags_at + 1] &= ~0x08 & 0xFF  # CLIENT_SSL is 0x0800 of the lower flags
        client_writer.write(header + greeting)
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_mariadb_refuses_a_server_hiding_tls(mariadb: MariaDBNode) -> None:
    async with tls_stripping_proxy(mariadb.port) as port:
        url = mariadb.url(f"ssl_ca={mariadb.certificates['ca']}", port=port)
        with pytest.raises(sa.exc.OperationalError, match="server does not offer it"):
            await scalar(url, "SELECT 1")
