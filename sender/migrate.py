"""Applies the numbered schema scripts of ``db-init/<kind>/`` to a database.

The scripts are the schema's single source of truth, written for the stock
clients (``psql -f``, ``mysql < file``); this runs the same files through
SQLAlchemy so the sender image can migrate without those clients. Each script
is idempotent and records its number in ``schema_version``; scripts at or
below the recorded version are skipped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

SCRIPT_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


def default_scripts_dir() -> Path:
    """``DB_INIT_DIR`` if set, else ``db-init/`` next to the package (a source checkout or the image)."""
    configured = os.environ.get("DB_INIT_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parent.parent / "db-init"


def kind_of(engine: AsyncEngine) -> str:
    """The ``db-init`` folder for this engine's database: ``postgres`` or ``mysql``."""
    name = engine.dialect.name
    if name == "postgresql":
        return "postgres"
    if name in ("mysql", "mariadb"):
        return "mysql"
    raise ValueError(f"unsupported database dialect {name!r}: use PostgreSQL or MySQL/MariaDB")


@dataclass(frozen=True, slots=True)
class Script:
    version: int
    name: str
    path: Path


def schema_scripts(kind: str, scripts_dir: Path | None = None) -> list[Script]:
    """The numbered scripts of one database kind, in the order they apply."""
    folder = (scripts_dir or default_scripts_dir()) / kind
    found = []
    for path in folder.glob("*.sql"):
        match = SCRIPT_NAME.match(path.name)
        if match:
            found.append(Script(int(match.group(1)), match.group(2), path))
    if not found:
        raise FileNotFoundError(f"no schema scripts in {folder}")
    return sorted(found, key=lambda script: script.version)


def statements(sql: str) -> list[str]:
    """Split a script into statements: ``;`` at the end of a line ends one; ``--`` lines are comments.

    Enough for our own scripts, which keep semicolons out of strings on purpose.
    """
    result: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        current.append(line)
        if stripped.endswith(";"):
            result.append("\n".join(current).rstrip().rstrip(";"))
            current = []
    if current:
        result.append("\n".join(current))
    return result


async def current_version(conn: AsyncConnection) -> int:
    """The highest schema version applied, 0 for an empty database."""
    if not await conn.run_sync(lambda sync: sa.inspect(sync).has_table("schema_version")):
        return 0
    version = (await conn.execute(sa.text("SELECT MAX(version) FROM schema_version"))).scalar()
    return int(version or 0)


async def migrate(engine: AsyncEngine, scripts_dir: Path | None = None) -> list[int]:
    """Apply every script newer than the database; return the versions applied."""
    applied = []
    async with engine.connect() as conn:
        version = await current_version(conn)
    for script in schema_scripts(kind_of(engine), scripts_dir):
        if script.version <= version:
            continue
        # DDL commits implicitly on MySQL anyway; each statement in its own transaction keeps both alike.
        for statement in statements(script.path.read_text()):
            async with engine.begin() as conn:
                await conn.exec_driver_sql(statement)
        applied.append(script.version)
    return applied


async def schema_version(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return await current_version(conn)
