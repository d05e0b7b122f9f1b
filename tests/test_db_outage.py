"""A token database outage: tokens seen recently keep working, unknown ones get 503 (not 401),
usage rows wait and are written once the database is back. The outage is a proxy in front of
the real database being cut, so the shared database itself is never stopped."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from sender.token_records import TokenFields, add_token
from tests.conftest import DATABASE_URLS, Processes, auth, unique
from tests.tcpproxy import TcpProxy
from tests.test_usage import usage_rows


async def test_database_outage_keeps_recent_tokens_working(
    processes: Processes, ready_model: str, engines: dict[str, AsyncEngine]
) -> None:
    engine = engines["postgres"]
    real = make_url(DATABASE_URLS["postgres"])
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    await proxy.start()
    through_proxy = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    known_name = unique("outage-known")
    known = await add_token(engine, known_name, fields=TokenFields(priority=5))
    newcomer = await add_token(engine, unique("outage-new"), fields=TokenFields(priority=5))
    front = await asyncio.to_thread(
        processes.sender,
        "postgres",
        database_url=through_proxy,
        token_cache_seconds=0.2,
        usage_flush_seconds=0.2,
    )
    body = {"model": ready_model, "prompt": "x", "max_tokens": 2}
    try:
        async with httpx.AsyncClient(base_url=front.url) as http:
            assert (await http.post("/v1/completions", json=body, headers=auth(known))).status_code == 200
            await proxy.stop()
            await asyncio.sleep(0.5)  # the cached entry is now older than its TTL
            during = [await http.post("/v1/completions", json=body, headers=auth(known)) for _ in range(3)]
            assert [r.status_code for r in during] == [200, 200, 200]
            unknown = await http.post("/v1/completions", json=body, headers=auth(newcomer))
            assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "auth_unavailable"
            assert unknown.headers["retry-after"]
            # Still ready: taking this replica out of service would stop the traffic that works.
            for _ in range(30):
                ready = await http.get("/health/ready")
                if not ready.json()["database"]:
                    break
                await asyncio.sleep(0.1)
            assert ready.status_code == 200 and ready.json()["database"] is False

            await proxy.start()
            for _ in range(100):
                status = (await http.post("/v1/completions", json=body, headers=auth(newcomer))).status_code
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200
        # Rows of requests served during the outage waited in the buffer.
        assert len(await usage_rows(engine, known_name, 4)) == 4
        log = front.log_path.read_text()
        assert known not in log and newcomer not in log
    finally:
        await proxy.stop()
