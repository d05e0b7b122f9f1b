"""Token secrets at rest and at the door: peppered hashes made alike by the sender and the operators'
SQL scripts on both databases, legacy rows upgraded, bad inputs refused by the scripts, random keys that
cannot evict known tokens, and clients that keep failing authentication refused for a while."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from harness.api import auth, status_of
from harness.dbclients import admin_script
from harness.observe import scrape, total
from harness.processes import Processes
from harness.stack import Service
from harness.testrun import DATABASE_URLS, unique
from harness.tokens import create_token
from sender.tables import tokens_table
from sender.tokens import HASH_HMAC, HASH_SHA256, SecretHasher, TokenStore, hash_secret

KINDS = ["postgres", "mysql"]
PEPPERS = ["pep", "p" * 64, "0123456789abcdef" * 5, "k3y-with 'quotes' and \\ backslash"]


def sql_script(kind: str, script: str, **params: object) -> str:
    return admin_script(kind, DATABASE_URLS[kind], script, **params)


async def stored(engine: AsyncEngine, name: str) -> Any:
    t = tokens_table.c
    statement = sa.select(t.token_hash, t.hash_kind, t.priority, t.threshold).where(t.name == name)
    async with engine.connect() as conn:
        return (await conn.execute(statement)).one()


async def looked_up(engine: AsyncEngine, secret: str, hasher: SecretHasher) -> str | None:
    """The sender's own lookup, uncached (a new store each time): the token's name, or None."""
    store = TokenStore(engine, ttl=60, negative_ttl=60, max_entries=10, hasher=hasher)
    try:
        token = await store.lookup(secret)
    finally:
        await store.close()
    return token.name if token is not None else None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pepper", PEPPERS, ids=["short", "block", "long", "quoted"])
async def test_sql_scripts_hash_with_the_pepper_exactly_as_the_sender(
    kind: str, pepper: str, engines: dict[str, AsyncEngine]
) -> None:
    engine = engines[kind]
    name = unique(f"pepper-{kind}-{len(pepper)}")
    secret = f"sk-chosen-{secrets.token_hex(4)}"
    sql_script(kind, "add_token.sql", name=name, secret=secret, pepper=pepper, priority=3)
    row = await stored(engine, name)
    assert row.token_hash == hash_secret(secret, pepper.encode()) != hash_secret(secret)
    assert row.hash_kind == HASH_HMAC
    assert await looked_up(engine, secret, SecretHasher(pepper.encode())) == name
    assert await looked_up(engine, secret, SecretHasher(b"another pepper")) is None
    assert await looked_up(engine, secret, SecretHasher()) is None  # a sender without the pepper


@pytest.mark.parametrize("kind", KINDS)
async def test_a_legacy_row_keeps_working_with_a_pepper_and_is_upgraded(
    kind: str, engines: dict[str, AsyncEngine]
) -> None:
    engine = engines[kind]
    name = unique(f"legacy-{kind}")
    secret = f"sk-legacy-{secrets.token_hex(4)}"
    sql_script(kind, "add_token.sql", name=name, secret=secret)  # no pepper: as before schema 5
    assert await stored(engine, name) == (hash_secret(secret), HASH_SHA256, 0, 100)
    pepper = b"the-senders-pepper"
    # A sender that no longer accepts plain hashes does not know it; one that does, upgrades it.
    assert await looked_up(engine, secret, SecretHasher(pepper, accept_legacy=False)) is None
    assert await looked_up(engine, secret, SecretHasher(pepper)) == name
    assert await stored(engine, name) == (hash_secret(secret, pepper), HASH_HMAC, 0, 100)
    assert await looked_up(engine, secret, SecretHasher(pepper, accept_legacy=False)) == name
    assert await looked_up(engine, secret, SecretHasher()) is None  # the plain hash is gone


async def test_a_sender_with_a_pepper_serves_old_and_new_tokens(
    processes: Processes, ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    engine = engines["postgres"]
    pepper = f"pepper-{secrets.token_hex(8)}"
    old = await create_token(engine, unique("before-pepper"), priority=5, threshold=1000)
    new = await create_token(engine, unique("with-pepper"), priority=5, threshold=1000, pepper=pepper)
    front = await asyncio.to_thread(processes.sender, "postgres", token_pepper=pepper)
    assert await status_of(front, old, ready_model) == 200
    assert await status_of(front, new, ready_model) == 200
    assert (await stored(engine, unique("before-pepper"))).hash_kind == HASH_HMAC
    assert await status_of(front, "sk-" + secrets.token_urlsafe(32), ready_model) == 401
    await asyncio.to_thread(front.stop)


BAD_INPUTS: list[tuple[str, dict[str, object], str]] = [
    ("add_token.sql", {"priority": 12}, "priority must be an integer from 0 to 9"),
    ("add_token.sql", {"priority": -3}, "priority must be an integer from 0 to 9"),
    ("add_token.sql", {"threshold": -5}, "threshold must be an integer of at least 1"),
    ("add_token.sql", {"threshold": 0}, "threshold must be an integer of at least 1"),
    ("add_token.sql", {"rpm": 0}, "rpm must be a positive integer per minute"),
    ("add_token.sql", {"tpm": -1}, "tpm must be a positive integer per minute"),
    ("add_token.sql", {"max_seconds": 0}, "max_seconds must be a positive number of seconds"),
    ("add_token.sql", {"max_parallel": 0}, "max_parallel must be a positive integer"),
    ("set_token.sql", {"max_parallel": "2.5"}, "max_parallel must be a positive integer"),
    ("add_token.sql", {"expires": "next year"}, "expires must be a date (2027-01-01)"),
    ("set_token.sql", {"priority": 10}, "priority must be an integer from 0 to 9"),
    ("set_token.sql", {"threshold": -5}, "threshold must be an integer of at least 1"),
    ("set_token.sql", {"rpm": -60}, "rpm must be a positive integer per minute"),
    ("set_token.sql", {"expires": "31/12/2027"}, "expires must be a date"),
]


@pytest.mark.parametrize("kind", KINDS)
async def test_sql_scripts_refuse_bad_inputs_and_write_nothing(
    kind: str, engines: dict[str, AsyncEngine]
) -> None:
    engine = engines[kind]
    name = unique(f"refusing-{kind}")
    sql_script(
        kind, "add_token.sql", name=name, secret=f"sk-{secrets.token_hex(8)}", priority=4, threshold=50
    )
    before = await stored(engine, name)
    for script, params, message in BAD_INPUTS:
        secret = {"secret": f"sk-{secrets.token_hex(8)}"} if script == "add_token.sql" else {}
        with pytest.raises(AssertionError) as refused:
            sql_script(kind, script, name=name, **secret, **params)
        assert message in str(refused.value), (script, params, str(refused.value))
        assert await stored(engine, name) == before, (script, params)
    # A larger scale, as the sender's SENDER_MAX_PRIORITY says, is accepted when given.
    sql_script(kind, "set_token.sql", name=name, priority=12, max_priority=20)
    assert (await stored(engine, name)).priority == 12


@pytest.mark.parametrize("kind", KINDS)
async def test_the_database_refuses_nonsense_rows(kind: str, engines: dict[str, AsyncEngine]) -> None:
    name = unique(f"checked-{kind}")
    await create_token(engines[kind], name)
    for column, value in [("priority", -1), ("priority", 256), ("threshold", 0), ("rpm_limit", 0)]:
        with pytest.raises(sa.exc.DBAPIError):
            async with engines[kind].begin() as conn:
                await conn.execute(
                    sa.update(tokens_table).where(tokens_table.c.name == name).values({column: value})
                )


async def token_queries(front: Service) -> float:
    _, samples = await scrape(front)
    return total(samples, "dispatcher_token_queries_total")


async def test_random_keys_do_not_evict_known_tokens(
    processes: Processes, ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    secret = await create_token(engines["postgres"], unique("sprayed-at"), priority=5, threshold=1000)
    front = await asyncio.to_thread(
        processes.sender,
        "postgres",
        token_cache_seconds=60,
        token_cache_size=20,
        unknown_token_cache_size=20,
        unknown_token_cache_seconds=60,
    )
    async with httpx.AsyncClient(base_url=front.url) as http:
        assert (await http.get("/v1/models", headers=auth(secret))).status_code == 200
        before = await token_queries(front)
        for _ in range(10):  # 200 random keys, ten times what either cache holds
            sprayed = [
                http.get("/v1/models", headers=auth("sk-" + secrets.token_urlsafe(24))) for _ in range(20)
            ]
            assert {r.status_code for r in await asyncio.gather(*sprayed)} == {401}
        after_spray = await token_queries(front)
        assert after_spray > before  # the random keys were asked for...
        for _ in range(20):
            assert (await http.get("/v1/models", headers=auth(secret))).status_code == 200
    assert await token_queries(front) == after_spray  # ...but the known token was never evicted
    await asyncio.to_thread(front.stop)


async def test_repeated_401s_from_one_client_get_429_for_a_while(
    processes: Processes, ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    secret = await create_token(engines["postgres"], unique("throttled-ip"), priority=5, threshold=1000)
    front = await asyncio.to_thread(
        processes.sender,
        "postgres",
        auth_failure_limit=5,
        auth_block_seconds=2,
        auth_failure_window_seconds=60,
    )
    async with httpx.AsyncClient(base_url=front.url) as http:
        assert (await http.get("/v1/models", headers=auth(secret))).status_code == 200  # known, cached
        statuses = [
            (await http.get("/v1/models", headers=auth(f"sk-wrong-{i}"))).status_code for i in range(5)
        ]
        assert statuses == [401] * 5
        refused = await http.post(
            "/v1/completions",
            json={"model": ready_model, "prompt": "x"},
            headers={**auth("sk-wrong-again"), "X-Forwarded-For": "203.0.113.9"},  # not trusted: ignored
        )
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_auth_failures"
        assert 1 <= int(refused.headers["retry-after"]) <= 2
        assert (await http.get("/v1/models")).status_code == 429  # no token at all: refused too
        # A known token from the same address keeps working; health is never refused.
        assert (await http.get("/v1/models", headers=auth(secret))).status_code == 200
        assert (await http.get("/health/live")).status_code == 200
        _, samples = await scrape(front)
        assert total(samples, "dispatcher_rejected_requests_total", reason="auth_throttled") == 2
        await asyncio.sleep(2.2)
        assert (await http.get("/v1/models", headers=auth("sk-wrong-later"))).status_code == 401
    await asyncio.to_thread(front.stop)


async def test_behind_a_trusted_proxy_clients_are_told_apart_by_x_forwarded_for(
    processes: Processes, ready_model: str
) -> None:
    front = await asyncio.to_thread(
        processes.sender, "postgres", auth_failure_limit=3, auth_block_seconds=30, trusted_proxies="127.0.0.1"
    )

    def from_(client: str) -> dict[str, str]:
        return {**auth("sk-wrong"), "X-Forwarded-For": f"198.51.100.1, {client}"}

    async with httpx.AsyncClient(base_url=front.url) as http:
        statuses = [(await http.get("/v1/models", headers=from_("192.0.2.1"))).status_code for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        assert (await http.get("/v1/models", headers=from_("192.0.2.2"))).status_code == 401
    await asyncio.to_thread(front.stop)
