"""Database URLs: what operators write, and what SQLAlchemy's async engine needs.

Kept apart from the app so the admin command starts without loading the web stack.
"""

from __future__ import annotations


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
