"""Operators' tools: the SQL scripts run with psql and mysql, and ``python -m sender.admin``,
on both databases, checked against what the sender then does."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from harness import stack
from harness.api import status_of, until_status
from harness.dbclients import admin_script
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import DATABASE_URLS, unique
from sender.admin import parser
from sender.token_records import usage_report
from sender.tokens import Token, TokenStore, hash_secret

KINDS = ["postgres", "mysql"]


@pytest_asyncio.fixture(scope="module")
async def senders(processes: Processes, sender: Service, ready_model: str) -> dict[str, Service]:
    """A sender on each database (the token cache lasts 1 s in the tests)."""
    mysql_sender = processes.sender("mysql")
    return {"postgres": sender, "mysql": mysql_sender}


def sql_script(kind: str, script: str, **params: object) -> str:
    return admin_script(kind, DATABASE_URLS[kind], script, **params)


async def usage_rows_appear(engine: AsyncEngine, name: str, requests: int) -> None:
    """Usage rows are written in batches, about every second."""
    for _ in range(100):
        rows = await usage_report(engine, name=name)
        if rows and rows[0]["requests"] >= requests:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no usage rows for {name}")


@pytest.mark.parametrize("kind", KINDS)
async def test_sql_scripts_manage_tokens_the_sender_honours(
    kind: str, senders: dict[str, Service], ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    front = senders[kind]
    name = unique(f"sql-{kind}")
    secret = f"sk-operator-chosen-{kind}-{unique('s')}"
    sql_script(kind, "add_token.sql", name=name, secret=secret, priority=5, threshold=100)
    assert await status_of(front, secret, ready_model) == 200  # hashed exactly as the sender checks it

    sql_script(kind, "set_token.sql", name=name, priority=7, rpm=1000, models="other-model")
    await until_status(front, secret, ready_model, 404)  # the model is no longer allowed
    sql_script(kind, "set_token.sql", name=name, models="none")
    await until_status(front, secret, ready_model, 200)

    listing = sql_script(kind, "list_tokens.sql")
    assert name in listing and hash_secret(secret)[:8] in listing
    assert hash_secret(secret) not in listing and secret not in listing
    line = next(line for line in listing.splitlines() if name in line)
    assert "7" in line and "1000" in line

    await usage_rows_appear(engines[kind], name, 1)
    report = sql_script(kind, "usage.sql", name=name)
    assert name in report and ready_model in report

    sql_script(kind, "revoke_token.sql", name=name)
    await until_status(front, secret, ready_model, 401)


@pytest.mark.parametrize("kind", KINDS)
async def test_admin_cli_manages_tokens(
    kind: str, senders: dict[str, Service], ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    url, front = DATABASE_URLS[kind], senders[kind]
    name = unique(f"cli-{kind}")
    secret = stack.admin(url, "add-token", "--name", name, "--priority", "4", "--owner", "team-a").strip()
    assert secret.startswith("sk-") and len(secret) >= 40 and "\n" not in secret
    assert await status_of(front, secret, ready_model) == 200

    table = stack.admin(url, "list-tokens")
    listed = {row["name"]: row for row in json.loads(stack.admin(url, "list-tokens", "--json"))}
    assert name in table and secret not in table and hash_secret(secret) not in table
    assert listed[name]["owner"] == "team-a" and listed[name]["priority"] == 4
    assert listed[name]["hash_prefix"] == hash_secret(secret)[:8]

    stack.admin(url, "set-token", "--name", name, "--rpm", "600", "--tpm", "none", "--expires", "30d")
    row = {r["name"]: r for r in json.loads(stack.admin(url, "list-tokens", "--json"))}[name]
    assert row["rpm"] == 600 and row["tpm"] is None and row["expires"] is not None

    await usage_rows_appear(engines[kind], name, 1)
    table = stack.admin(url, "usage", "--since", "1h")
    assert name in table and ready_model in table
    [used] = json.loads(stack.admin(url, "usage", "--name", name, "--json"))
    assert used["model"] == ready_model and used["requests"] == 1 and used["completion_tokens"] == 2

    stack.admin(url, "revoke-token", "--name", name)
    await until_status(front, secret, ready_model, 401)
    stack.admin(url, "set-token", "--name", name, "--enable")
    await until_status(front, secret, ready_model, 200)

    # A secret from a file (a mounted Kubernetes Secret) replaces the token's and is not printed.
    chosen = f"sk-from-file-{unique(kind)}"
    out = stack.admin(url, "add-token", "--name", name, "--secret-file", "-", stdin=chosen + "\n")
    assert out == ""
    await until_status(front, chosen, ready_model, 200)
    await until_status(front, secret, ready_model, 401)


async def uncached_lookup(engine: AsyncEngine, secret: str) -> Token:
    """The sender's own lookup, uncached (a new store each time)."""
    store = TokenStore(engine, ttl=60, negative_ttl=60, max_entries=10)
    try:
        token = await store.lookup(secret)
    finally:
        await store.close()
    assert token is not None
    return token


def listed_tokens(url: str) -> dict[str, dict[str, object]]:
    """The CLI's token list, by name."""
    return {row["name"]: row for row in json.loads(stack.admin(url, "list-tokens", "--json"))}


@pytest.mark.parametrize("kind", KINDS)
async def test_max_seconds_is_set_and_cleared_by_scripts_and_cli_and_looked_up(
    kind: str, engines: dict[str, AsyncEngine]
) -> None:
    url = DATABASE_URLS[kind]
    name = unique(f"deadline-{kind}")
    secret = f"sk-deadline-{kind}-{unique('s')}"

    async def looked_up() -> object:
        return (await uncached_lookup(engines[kind], secret)).max_seconds

    def listed() -> object:
        return listed_tokens(url)[name]["max_seconds"]

    sql_script(kind, "add_token.sql", name=name, secret=secret, max_seconds=60)
    assert await looked_up() == 60
    sql_script(kind, "set_token.sql", name=name, max_seconds="2.5")
    assert await looked_up() == 2.5
    line = next(line for line in sql_script(kind, "list_tokens.sql").splitlines() if name in line)
    assert "2.5" in line
    sql_script(kind, "set_token.sql", name=name, priority=3)  # fields not given stay
    assert await looked_up() == 2.5
    sql_script(kind, "set_token.sql", name=name, max_seconds="none")
    assert await looked_up() is None
    with pytest.raises(AssertionError):  # refused by the database, whichever way it comes
        sql_script(kind, "set_token.sql", name=name, max_seconds=0)
    assert await looked_up() is None

    stack.admin(url, "set-token", "--name", name, "--max-seconds", "90")
    assert listed() == 90 and await looked_up() == 90
    stack.admin(url, "set-token", "--name", name, "--priority", "4")
    assert listed() == 90
    assert "max_seconds" in stack.admin(url, "list-tokens").splitlines()[0]
    stack.admin(url, "set-token", "--name", name, "--max-seconds", "none")
    assert listed() is None and await looked_up() is None
    for nonsense in ("0", "-5", "soon"):
        with pytest.raises(subprocess.CalledProcessError):
            stack.admin(url, "set-token", "--name", name, "--max-seconds", nonsense)
    stack.admin(url, "add-token", "--name", name, "--max-seconds", "30", "--secret-file", "-", stdin=secret)
    assert listed() == 30 and await looked_up() == 30
    stack.admin(url, "add-token", "--name", name, "--secret-file", "-", stdin=secret)  # replaced: cleared
    assert listed() is None and await looked_up() is None


def test_every_command_has_help() -> None:
    commands = ["migrate", "init-db", "schema-version", "add-token", "set-token", "revoke-token"]
    for command in [*commands, "list-tokens", "usage"]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            parser().parse_args([command, "--help"])
        assert exit_.value.code == 0 and f"usage: python -m sender.admin {command}" in out.getvalue()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("script", ["revoke_token.sql", "set_token.sql"])
def test_scripts_say_when_no_token_has_that_name(kind: str, script: str) -> None:
    name = unique("nobody")
    fields: dict[str, object] = {"priority": 3} if script == "set_token.sql" else {}
    output = sql_script(kind, script, name=name, **fields)
    assert f"no token named {name}: nothing changed" in output


@pytest.mark.parametrize("kind", KINDS)
async def test_max_parallel_is_set_and_cleared_by_scripts_and_cli_and_looked_up(
    kind: str, engines: dict[str, AsyncEngine]
) -> None:
    url = DATABASE_URLS[kind]
    name = unique(f"parallel-{kind}")
    secret = f"sk-parallel-{kind}-{unique('s')}"

    async def looked_up() -> object:
        return (await uncached_lookup(engines[kind], secret)).max_parallel

    def listed() -> object:
        return listed_tokens(url)[name]["max_parallel"]

    sql_script(kind, "add_token.sql", name=name, secret=secret, max_parallel=4)
    assert await looked_up() == 4
    sql_script(kind, "set_token.sql", name=name, max_parallel=7)
    assert await looked_up() == 7
    sql_script(kind, "set_token.sql", name=name, priority=3)  # fields not given stay
    assert await looked_up() == 7
    sql_script(kind, "set_token.sql", name=name, max_parallel="none")
    assert await looked_up() is None

    stack.admin(url, "set-token", "--name", name, "--max-parallel", "3")
    assert listed() == 3 and await looked_up() == 3
    stack.admin(url, "set-token", "--name", name, "--max-parallel", "none")
    assert listed() is None and await looked_up() is None
    with pytest.raises(
        subprocess.CalledProcessError
    ):  # the parser's refusals: tests/unit/test_token_inputs.py
        stack.admin(url, "set-token", "--name", name, "--max-parallel", "0")
    stack.admin(url, "add-token", "--name", name, "--max-parallel", "2", "--secret-file", "-", stdin=secret)
    assert listed() == 2 and await looked_up() == 2
