"""Database URLs: what operators write, and the async engine built from them.

Kept apart from the app so the admin command starts without loading the web stack.
Every async engine of the sender, the admin command, the tools and the harness is
made by :func:`create_engine`, so the URL is read, and TLS set up, in one place.

TLS. PostgreSQL: libpq's own parameters in the URL (``sslmode=verify-full``,
``sslrootcert=<CA file>``, ``sslcert``, ``sslkey``) reach psycopg unchanged.
MySQL/MariaDB: aiomysql wants an :class:`ssl.SSLContext`, which SQLAlchemy does not
build from a URL, so the parameters of :data:`MYSQL_TLS_PARAMETERS` are taken out of
the URL here and turned into one. With any of them the connection must be TLS: a
server that does not offer it is refused before any credential is sent.
"""

from __future__ import annotations

import ssl
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MYSQL_TLS_PARAMETERS = {
    "ssl": "true: TLS, the server's certificate checked against the system's CAs (false: no TLS)",
    "ssl_ca": "CA file (PEM) the server's certificate must chain to; implies TLS",
    "ssl_cert": "client certificate (PEM) presented to the server",
    "ssl_key": "key (PEM) of the client certificate",
    "ssl_check_hostname": "true (default): the host of the URL must match the certificate; false: any name",
}
"""The URL query parameters a ``mysql+aiomysql://`` URL may carry for TLS, and what each does."""

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class DatabaseUrlError(ValueError):
    """A database URL this module cannot honour (an unknown TLS parameter, a bad value)."""


def async_database_url(url: str) -> str:
    """Accept plain ``postgresql://`` and ``mysql://`` URLs and pick the async drivers for them."""
    for plain, driver in (
        ("postgresql://", "postgresql+psycopg://"),
        ("postgres://", "postgresql+psycopg://"),
        ("mysql://", "mysql+aiomysql://"),
        ("mariadb://", "mysql+aiomysql://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise DatabaseUrlError(f"database URL: {name}={value!r} is not a boolean (true or false)")


def mysql_ssl_context(params: dict[str, str]) -> ssl.SSLContext | None:
    """The TLS context the parameters of :data:`MYSQL_TLS_PARAMETERS` ask for, or None for no TLS."""
    unknown = sorted(set(params) - set(MYSQL_TLS_PARAMETERS))
    if unknown:
        raise DatabaseUrlError(
            f"database URL: unknown TLS parameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(MYSQL_TLS_PARAMETERS)}"
        )
    wanted = _flag("ssl", params["ssl"]) if "ssl" in params else None
    if wanted is False:
        if len(params) > 1:
            raise DatabaseUrlError("database URL: ssl=false contradicts the other ssl_* parameters")
        return None
    if wanted is None and not params:
        return None
    if ("ssl_cert" in params) != ("ssl_key" in params):
        raise DatabaseUrlError("database URL: ssl_cert and ssl_key go together")
    context = ssl.create_default_context(cafile=params.get("ssl_ca"))
    context.check_hostname = _flag("ssl_check_hostname", params.get("ssl_check_hostname", "true"))
    if "ssl_cert" in params:
        context.load_cert_chain(params["ssl_cert"], params["ssl_key"])
    return context


def engine_arguments(url: str) -> tuple[sa.URL, dict[str, Any]]:
    """The URL SQLAlchemy's async engine gets for an operator's ``url``, and its ``connect_args``."""
    parsed = sa.make_url(async_database_url(url))
    if parsed.get_backend_name() not in ("mysql", "mariadb"):
        return parsed, {}
    tls = {key: value for key, value in parsed.query.items() if key.startswith("ssl")}
    for key, value in tls.items():
        if not isinstance(value, str):
            raise DatabaseUrlError(f"database URL: {key} given more than once")
    context = mysql_ssl_context({key: str(value) for key, value in tls.items()})
    stripped = parsed.difference_update_query(tls)
    if context is None:
        return stripped, {}
    return stripped, {"ssl": context, "async_creator_fn": _connect_tls_only}


async def _connect_tls_only(**kwargs: Any) -> Any:
    """An aiomysql connection that refuses a server not offering TLS, before sending credentials.

    aiomysql alone falls back to plaintext when the server's greeting lacks the SSL
    capability, which anyone in the path can strip.
    """
    import aiomysql
    from pymysql.constants import CLIENT
    from pymysql.err import OperationalError

    class TlsOnlyConnection(aiomysql.Connection):  # type: ignore[misc]
        async def _request_authentication(self) -> None:
            if not self.server_capabilities & CLIENT.SSL:
                raise OperationalError(
                    2026, "TLS was asked for (ssl_* in the URL) but the server does not offer it"
                )
            await super()._request_authentication()

    connection = TlsOnlyConnection(**kwargs)
    try:
        await connection._connect()
    except BaseException:
        connection.close()
        raise
    return connection


def create_engine(url: str, **options: Any) -> AsyncEngine:
    """The async engine for an operator's database URL (TLS parameters included); ``options`` as
    :func:`sqlalchemy.ext.asyncio.create_async_engine`'s."""
    engine_url, connect_args = engine_arguments(url)
    if connect_args:
        options["connect_args"] = {**connect_args, **options.get("connect_args", {})}
    return create_async_engine(engine_url, **options)
