"""Token rows and usage reports in the database: what ``python -m sender.admin`` and the tests do.

The same operations exist as SQL scripts in ``db-init/`` for operators who
only have ``psql`` or ``mysql``; both store exactly what the sender checks.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from sender.tables import tokens_table, usage_table
from sender.tokens import HASH_HMAC, HASH_SHA256, format_models, hash_secret, new_secret, parse_models

UNSET: Any = object()
"""A field left as it is by :func:`set_token` (None clears an optional field)."""

STORED_PRIORITY_MAX = 255
"""The highest priority a row may hold (RabbitMQ's largest ``x-max-priority``; the database's CHECK
says the same). The admin CLI holds tokens to the sender's own scale, ``SENDER_MAX_PRIORITY``."""


class InvalidTokenField(ValueError):
    """A token field outside what the sender can honour; the message says what is accepted."""


def check_columns(values: dict[str, Any]) -> None:
    """Refuse values the sender could not honour (a priority off the scale, a threshold that refuses
    every request, a limit of zero or less), before the database's own CHECK refuses them less clearly."""
    priority = values.get("priority")
    if priority is not None and not (isinstance(priority, int) and 0 <= priority <= STORED_PRIORITY_MAX):
        raise InvalidTokenField(
            f"priority must be an integer from 0 to {STORED_PRIORITY_MAX}, got {priority!r}"
        )
    threshold = values.get("threshold")
    if threshold is not None and not (isinstance(threshold, int) and threshold >= 1):
        raise InvalidTokenField(f"threshold must be an integer of at least 1, got {threshold!r}")
    for column in ("rpm_limit", "tpm_limit", "max_parallel"):
        limit = values.get(column)
        if limit is not None and not (isinstance(limit, int) and limit >= 1):
            name = column.removesuffix("_limit")
            raise InvalidTokenField(f"{name} must be a positive integer (or none: no limit), got {limit!r}")
    seconds = values.get("max_seconds")
    if seconds is not None and not (0 < seconds < float("inf")):
        raise InvalidTokenField(
            f"max_seconds must be a positive number of seconds (or none), got {seconds!r}"
        )


@dataclass(frozen=True, slots=True)
class TokenFields:
    """Everything about a token but its secret."""

    owner: str | None = None
    priority: int = 0
    threshold: int = 100
    enabled: bool = True
    expires_at: dt.datetime | None = None
    """In the database's local time, like every timestamp it stores."""
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_seconds: float | None = None
    """Seconds a request of this token may take at most; None: the server's deadline."""
    max_parallel: int | None = None
    """Requests queued or running at once (per sender replica); None: no limit."""

    def columns(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "priority": self.priority,
            "threshold": self.threshold,
            "enabled": self.enabled,
            "expires_at": self.expires_at,
            "allowed_models": format_models(self.models),
            "rpm_limit": self.rpm,
            "tpm_limit": self.tpm,
            "max_seconds": self.max_seconds,
            "max_parallel": self.max_parallel,
        }


async def add_token(
    engine: AsyncEngine,
    name: str,
    *,
    secret: str | None = None,
    fields: TokenFields | None = None,
    pepper: bytes | None = None,
) -> str:
    """Store a token and return its secret (generated unless given).

    A token of the same name is replaced: new secret, fields as given, enabled. The secret is
    hashed with ``pepper`` (HMAC-SHA-256) if given, as the sender with the same pepper checks it;
    else with plain SHA-256 (which a sender with a pepper still accepts, and upgrades).
    """
    secret = secret or new_secret()
    values = (fields or TokenFields()).columns()
    check_columns(values)
    values["token_hash"] = hash_secret(secret, pepper)
    values["hash_kind"] = HASH_HMAC if pepper else HASH_SHA256
    async with engine.begin() as conn:
        existing = (
            await conn.execute(sa.select(tokens_table.c.id).where(tokens_table.c.name == name))
        ).scalar()
        if existing is None:
            await conn.execute(sa.insert(tokens_table).values(name=name, **values))
        else:
            await conn.execute(sa.update(tokens_table).where(tokens_table.c.id == existing).values(**values))
    return secret


async def set_token(engine: AsyncEngine, name: str, **changes: Any) -> bool:
    """Change some fields of a token (keys of :class:`TokenFields`); False if there is no such token."""
    columns = TokenFields().columns()
    values: dict[str, Any] = {}
    for key, value in changes.items():
        if value is UNSET:
            continue
        if key == "models":
            values["allowed_models"] = format_models(value)
        elif key in ("rpm", "tpm"):
            values[f"{key}_limit"] = value
        elif key in columns:
            values[key] = value
        else:
            raise ValueError(f"unknown token field {key}")
    check_columns(values)
    async with engine.begin() as conn:
        found = (await conn.execute(sa.select(tokens_table.c.id).where(tokens_table.c.name == name))).scalar()
        if found is None:
            return False
        if values:
            await conn.execute(sa.update(tokens_table).where(tokens_table.c.id == found).values(**values))
    return True


async def revoke_token(engine: AsyncEngine, name: str) -> bool:
    """Disable a token (its row and usage stay); False if there is no such token."""
    return await set_token(engine, name, enabled=False)


async def database_now(engine: AsyncEngine) -> dt.datetime:
    """The database's local time, the clock every stored timestamp follows."""
    async with engine.connect() as conn:
        now: dt.datetime = (await conn.execute(sa.select(sa.func.localtimestamp()))).scalar_one()
    return now


async def list_tokens(engine: AsyncEngine) -> list[dict[str, Any]]:
    """Every token without its hash (only its first 8 characters, to tell tokens apart)."""
    t = tokens_table.c
    statement = sa.select(
        t.name,
        t.owner,
        t.priority,
        t.threshold,
        t.enabled,
        t.created_at,
        t.expires_at,
        t.allowed_models,
        t.rpm_limit,
        t.tpm_limit,
        t.max_seconds,
        t.max_parallel,
        t.token_hash,
        t.hash_kind,
    ).order_by(t.name)
    async with engine.connect() as conn:
        rows = (await conn.execute(statement)).mappings().all()
    return [
        {
            "name": row["name"],
            "owner": row["owner"],
            "priority": row["priority"],
            "threshold": row["threshold"],
            "enabled": bool(row["enabled"]),
            "created": _iso(row["created_at"]),
            "expires": _iso(row["expires_at"]),
            "models": parse_models(row["allowed_models"]),
            "rpm": row["rpm_limit"],
            "tpm": row["tpm_limit"],
            "max_seconds": row["max_seconds"],
            "max_parallel": row["max_parallel"],
            "hash_prefix": row["token_hash"][:8],
            "hash_kind": row["hash_kind"],
        }
        for row in rows
    ]


async def usage_report(
    engine: AsyncEngine,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Requests, errors and tokens per token and model between ``since`` and ``until``
    (database local time; default: the last 24 hours)."""
    u = usage_table.c
    now = await database_now(engine)
    since = since or now - dt.timedelta(days=1)
    until = until or now + dt.timedelta(minutes=1)
    statement = (
        sa.select(
            u.token_name,
            u.model,
            sa.func.count().label("requests"),
            sa.func.sum(sa.case((u.status >= 400, 1), else_=0)).label("errors"),
            sa.func.sum(u.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(u.completion_tokens).label("completion_tokens"),
            sa.func.avg(u.queue_ms).label("avg_queue_ms"),
            sa.func.avg(u.total_ms).label("avg_total_ms"),
        )
        .where(u.finished_at >= since, u.finished_at < until)
        .group_by(u.token_name, u.model)
        .order_by(u.token_name, u.model)
    )
    if name is not None:
        statement = statement.where(u.token_name == name)
    async with engine.connect() as conn:
        rows = (await conn.execute(statement)).mappings().all()
    return [
        {
            "token": row["token_name"],
            "model": row["model"],
            "requests": int(row["requests"]),
            "errors": int(row["errors"] or 0),
            "prompt_tokens": int(row["prompt_tokens"] or 0),
            "completion_tokens": int(row["completion_tokens"] or 0),
            "avg_queue_ms": _rounded(row["avg_queue_ms"]),
            "avg_total_ms": _rounded(row["avg_total_ms"]),
        }
        for row in rows
    ]


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(sep=" ", timespec="seconds") if value is not None else None


def _rounded(value: Any) -> float | None:
    return round(float(value), 1) if value is not None else None
