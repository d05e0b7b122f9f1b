"""The db-init scripts: idempotent on both databases, applied by the stock clients and by
``sender.admin migrate`` alike, and exactly what the SQLAlchemy tables describe."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql as mysql_types
from sqlalchemy.ext.asyncio import create_async_engine

from harness import stack
from harness.dbclients import apply_scripts, mysql, psql
from harness.processes import Processes
from harness.testrun import RUN_ID, SERVER_URLS
from sender.migrate import schema_scripts
from sender.tables import metadata

KINDS = ["postgres", "mysql"]


@pytest.fixture
def fresh_database(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """An empty database of each kind, dropped after the test."""
    kind = request.param
    name = f"dispatch_{RUN_ID}_{request.node.name.split('[')[0][-20:]}"
    stack.create_database(SERVER_URLS[kind], name)
    try:
        yield kind, stack.with_database(SERVER_URLS[kind], name)
    finally:
        stack.drop_database(SERVER_URLS[kind], name)


def _generic(column_type: Any) -> tuple[str, int | None]:
    """A type as both databases can agree on it: family and, for strings, length."""
    if isinstance(column_type, sa.Boolean) or (
        isinstance(column_type, mysql_types.TINYINT) and column_type.display_width == 1
    ):
        return "bool", None
    if isinstance(column_type, sa.BigInteger):
        return "bigint", None
    if isinstance(column_type, sa.Integer):
        return "int", None
    if isinstance(column_type, sa.Float):
        return "float", None
    if isinstance(column_type, sa.Text) or (
        isinstance(column_type, sa.String) and column_type.length is None
    ):
        return "text", None
    if isinstance(column_type, sa.String):
        return "string", column_type.length
    if isinstance(column_type, sa.DateTime):
        return "datetime", None
    return type(column_type).__name__, None


def _described(inspector: sa.Inspector, table: str) -> dict[str, Any]:
    uniques: set[tuple[str | None, ...]] = {
        tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
    }
    uniques |= {tuple(i["column_names"]) for i in inspector.get_indexes(table) if i["unique"]}
    return {
        "columns": {c["name"]: (_generic(c["type"]), c["nullable"]) for c in inspector.get_columns(table)},
        "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
        "unique": uniques,
        "indexes": {i["name"] for i in inspector.get_indexes(table) if not i["unique"]},
    }


def _modelled(table: sa.Table) -> dict[str, Any]:
    return {
        "columns": {c.name: (_generic(c.type), c.nullable) for c in table.columns},
        "primary_key": [c.name for c in table.primary_key.columns],
        "unique": {(c.name,) for c in table.columns if c.unique},
        "indexes": {i.name for i in table.indexes},
    }


async def _check_models_match(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            found = await conn.run_sync(
                lambda sync: {t: _described(sa.inspect(sync), t) for t in metadata.tables}
            )
            version = (await conn.execute(sa.text("SELECT MAX(version) FROM schema_version"))).scalar()
    finally:
        await engine.dispose()
    for name, table in metadata.tables.items():
        assert found[name] == _modelled(table), f"table {name}: the scripts and sender/tables.py differ"
    assert version == max(s.version for s in schema_scripts("postgres"))


@pytest.mark.parametrize("fresh_database", KINDS, indirect=True)
async def test_stock_clients_apply_the_scripts_twice_and_the_models_match(
    fresh_database: tuple[str, str],
) -> None:
    kind, url = fresh_database
    scripts = [str(s.path.relative_to(stack.ROOT)) for s in schema_scripts(kind)]
    apply_scripts(kind, url, scripts)
    apply_scripts(kind, url, scripts)  # idempotent: nothing changes, nothing fails
    await _check_models_match(url)
    assert stack.admin(url, "migrate").strip().endswith("(already current)")


@pytest.mark.parametrize("fresh_database", KINDS, indirect=True)
async def test_migrate_twice_and_upgrade_from_the_first_schema(fresh_database: tuple[str, str]) -> None:
    kind, url = fresh_database
    assert stack.admin(url, "schema-version").strip() == "0"
    # A database made before the token fields existed (schema 1 only), holding a token.
    first = str(schema_scripts(kind)[0].path.relative_to(stack.ROOT))
    apply_scripts(kind, url, [first])
    insert = "INSERT INTO tokens (name, token_hash) VALUES ('old', 'abc')"
    psql(url, "-c", insert) if kind == "postgres" else mysql(url, "-e", insert)
    assert stack.admin(url, "schema-version").strip() == "1"
    assert "applied [2, 3, 4, 5, 6]" in stack.admin(url, "migrate")
    assert "already current" in stack.admin(url, "migrate")
    await _check_models_match(url)
    listed = stack.admin(url, "list-tokens", "--json")
    assert '"name": "old"' in listed and '"enabled": true' in listed


@pytest.mark.parametrize("fresh_database", KINDS, indirect=True)
async def test_the_token_deadline_upgrade_keeps_tokens_and_refuses_nonsense(
    fresh_database: tuple[str, str],
) -> None:
    kind, url = fresh_database
    scripts = [str(s.path.relative_to(stack.ROOT)) for s in schema_scripts(kind)]
    assert scripts[3].endswith("004_token_deadline.sql")
    apply_scripts(kind, url, scripts[:3])  # a database of schema 3, holding a token

    def run(sql: str) -> str:
        return psql(url, "-c", sql) if kind == "postgres" else mysql(url, "-e", sql)

    run("INSERT INTO tokens (name, token_hash) VALUES ('old', 'abc')")
    assert "applied [4, 5, 6]" in stack.admin(url, "migrate")
    apply_scripts(kind, url, scripts[3:])  # again, with the stock client: nothing changes, nothing fails
    assert "already current" in stack.admin(url, "migrate")
    await _check_models_match(url)
    [old] = json.loads(stack.admin(url, "list-tokens", "--json"))
    assert old["name"] == "old" and old["max_seconds"] is None  # the server's deadline, as before
    assert old["max_parallel"] is None  # schema 6: no parallel limit, as before
    run("UPDATE tokens SET max_seconds = 2.5 WHERE name = 'old'")
    for nonsense in ("0", "-1"):
        with pytest.raises(AssertionError):  # the client fails: the CHECK constraint refuses it
            run(f"UPDATE tokens SET max_seconds = {nonsense} WHERE name = 'old'")
    [old] = json.loads(stack.admin(url, "list-tokens", "--json"))
    assert old["max_seconds"] == 2.5


@pytest.mark.parametrize("fresh_database", ["postgres"], indirect=True)
async def test_a_sender_on_an_unmigrated_database_says_so(
    fresh_database: tuple[str, str], processes: Processes
) -> None:
    _, url = fresh_database
    front = await asyncio.to_thread(processes.sender, "postgres", database_url=url)
    await asyncio.to_thread(front.stop)
    assert "run `python -m sender.admin migrate`" in front.log_path.read_text()
