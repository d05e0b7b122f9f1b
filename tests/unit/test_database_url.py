"""The database URL as the engine gets it: drivers picked, TLS parameters turned into a context."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from harness.broker_node import make_test_certificates
from sender.database import DatabaseUrlError, create_engine, engine_arguments


def test_plain_urls_get_the_async_drivers() -> None:
    url, args = engine_arguments("postgresql://u:p@db:5432/d")
    assert url.drivername == "postgresql+psycopg" and args == {}
    url, args = engine_arguments("mariadb://u:p@db:3306/d")
    assert url.drivername == "mysql+aiomysql" and args == {}


def test_postgres_tls_parameters_reach_psycopg_unchanged() -> None:
    url, args = engine_arguments("postgresql+psycopg://u:p@db/d?sslmode=verify-full&sslrootcert=/ca.crt")
    assert dict(url.query) == {"sslmode": "verify-full", "sslrootcert": "/ca.crt"}
    assert args == {}
    engine = create_engine("postgresql+psycopg://u:p@db/d?sslmode=verify-full&sslrootcert=/ca.crt")
    _, kwargs = engine.dialect.create_connect_args(engine.url)
    assert kwargs["sslmode"] == "verify-full" and kwargs["sslrootcert"] == "/ca.crt"


def test_mysql_tls_parameters_become_a_verifying_context(tmp_path: Path) -> None:
    paths = make_test_certificates(tmp_path)
    url, args = engine_arguments(
        f"mysql+aiomysql://u:p@db/d?ssl_ca={paths['ca']}"
        f"&ssl_cert={paths['client_cert']}&ssl_key={paths['client_key']}&charset=utf8mb4"
    )
    assert dict(url.query) == {"charset": "utf8mb4"}
    context = args["ssl"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert callable(args["async_creator_fn"])


def test_mysql_ssl_true_uses_the_system_cas_and_hostname_check_can_be_turned_off() -> None:
    url, args = engine_arguments("mysql://u:p@db/d?ssl=true&ssl_check_hostname=false&charset=utf8mb4")
    assert dict(url.query) == {"charset": "utf8mb4"}
    assert args["ssl"].verify_mode == ssl.CERT_REQUIRED and not args["ssl"].check_hostname


def test_mysql_without_tls_parameters_is_left_alone() -> None:
    url, args = engine_arguments("mysql+aiomysql://u:p@db/d?charset=utf8mb4")
    assert dict(url.query) == {"charset": "utf8mb4"} and args == {}
    assert engine_arguments("mysql+aiomysql://u:p@db/d?ssl=false")[1] == {}


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("ssl_mode=VERIFY_IDENTITY", "unknown TLS parameter"),
        ("ssl_capath=/etc/ssl", "unknown TLS parameter"),
        ("ssl=maybe", "not a boolean"),
        ("ssl=false&ssl_ca=/ca.crt", "contradicts"),
        ("ssl=true&ssl_cert=/c.crt", "go together"),
    ],
)
def test_mysql_tls_parameters_it_cannot_honour_are_refused(query: str, complaint: str) -> None:
    with pytest.raises(DatabaseUrlError, match=complaint):
        engine_arguments(f"mysql+aiomysql://u:p@db/d?{query}")
