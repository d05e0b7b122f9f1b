"""The one way the harness creates tokens: a row written by ``sender.token_records.add_token``.

Tests, ``make run``, the benchmark, the soak run and ``tools.many_streams`` all
come here; only the tests of the admin command and of the SQL scripts use
those instead, since that is what they test. A token of the same name is
replaced (new secret, the fields given). Fields not given take the sender's
own defaults (``TokenFields``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from sender.database import create_engine
from sender.token_records import TokenFields, add_token


async def create_token(engine: AsyncEngine, name: str, *, pepper: str | None = None, **fields: Any) -> str:
    """Create (or replace) the token ``name`` with ``fields`` (those of ``TokenFields``); its secret.
    With ``pepper``, hashed as a sender with that ``SENDER_TOKEN_PEPPER`` checks it."""
    return await add_token(
        engine, name, fields=TokenFields(**fields), pepper=pepper.encode() if pepper else None
    )


async def create_tokens_at(database_url: str, names: list[str], **fields: Any) -> list[str]:
    """Tokens ``names``, all with ``fields``, in the database at ``database_url``; their secrets."""
    engine = create_engine(database_url)
    try:
        return [await create_token(engine, name, **fields) for name in names]
    finally:
        await engine.dispose()


async def create_token_at(database_url: str, name: str, **fields: Any) -> str:
    """One token in the database at ``database_url``; its secret."""
    [secret] = await create_tokens_at(database_url, [name], **fields)
    return secret
