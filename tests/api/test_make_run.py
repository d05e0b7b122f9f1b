"""``make run`` uses what it is pointed at, and says at once when it cannot start."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import httpx

from harness.api import auth
from harness.broker_node import BrokerNode
from harness.stack import ROOT, free_port
from harness.testrun import DATABASE_URLS, unique


async def run_tools_run(env: dict[str, str], timeout: float = 20) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.run",
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_a_taken_port_is_refused_at_once_naming_the_variable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        code, output = await run_tools_run({"SENDER_PORT": str(port)})
    assert code != 0
    assert f"port {port} is taken" in output and "SENDER_PORT" in output
    assert "is up" not in output  # nothing was started, no token replaced
    assert time.monotonic() - started < 15


async def test_a_broker_elsewhere_that_does_not_answer_is_named_and_nothing_local_is_started() -> None:
    dead = free_port()
    code, output = await run_tools_run(
        {
            "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{dead}/",
            "DATABASE_URL": DATABASE_URLS["postgres"],
            "SENDER_PORT": str(free_port()),
            "SENDER_METRICS_PORT": str(free_port()),
        }
    )
    assert code != 0
    assert f"RabbitMQ is not answering on 127.0.0.1:{dead}" in output
    assert "starting it" not in output


async def test_make_run_serves_through_a_broker_on_another_port() -> None:
    node = BrokerNode()
    node.start()
    port = free_port()
    model = unique("run")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.run",
        cwd=ROOT,
        env={
            **os.environ,
            "RABBITMQ_URL": node.url,
            "DATABASE_URL": DATABASE_URLS["postgres"],
            "SENDER_PORT": str(port),
            "SENDER_METRICS_PORT": str(free_port()),
            "MODEL": model,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        secret = ""
        async with asyncio.timeout(90):
            while not secret:
                line = (await process.stdout.readline()).decode()
                assert line, "make run ended before it was up"
                if line.startswith("export OPENAI_API_KEY="):
                    secret = line.strip().split("=", 1)[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth(secret)) as http:
            response = await http.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "Hi"}]},
                timeout=30,
            )
        assert response.status_code == 200, response.text
        assert (ROOT / ".run" / "latest" / "sender.log").is_file()  # this run's own logs
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
        node.stop()
