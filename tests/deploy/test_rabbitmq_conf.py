"""rabbitmq/rabbitmq.conf boots a real RabbitMQ node, private to this test (own node name, ports and
data directory, so the shared broker is untouched), and the node runs with its settings."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract import DEFAULT_BROKER_MAX_MESSAGE_SIZE
from harness.stack import free_port
from harness.testrun import RUN_ID

CONF = Path(__file__).resolve().parents[2] / "rabbitmq" / "rabbitmq.conf"
BROKER_USER = "rabbitmq"
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the Debian package's, without its root wrapper


def rabbitmqctl(node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-n", node, *args], capture_output=True, text=True, timeout=60)


def setting(node: str, name: str) -> str:
    result = rabbitmqctl(node, "eval", f"application:get_env(rabbit, {name}).")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@pytest.fixture
def private_node() -> Iterator[str]:
    if os.geteuid() != 0 or not Path(SERVER).exists():
        pytest.fail(
            f"this test starts {SERVER} as {BROKER_USER}: it needs root and RabbitMQ installed locally"
        )
    node = f"dispatch-conf-{RUN_ID}@localhost"
    broker = pwd.getpwnam(BROKER_USER)
    scratch = Path(tempfile.mkdtemp(prefix="dispatch-conf-"))
    try:
        config = scratch / "rabbitmq.conf"
        config.write_text(CONF.read_text() + f"\nlisteners.tcp.default = 127.0.0.1:{free_port()}\n")
        (scratch / "enabled_plugins").write_text("[].\n")
        for path in (scratch, *scratch.iterdir()):
            os.chown(path, broker.pw_uid, broker.pw_gid)
        scratch.chmod(0o755)
        env = {
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(scratch / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(scratch / "mnesia"),
            "RABBITMQ_LOG_BASE": str(scratch / "log"),
            "HOME": broker.pw_dir,  # where the Erlang cookie shared with rabbitmqctl lives
        }
        command = " ".join(["env", *(f"{k}={v}" for k, v in env.items()), SERVER])
        server = subprocess.Popen(
            ["su", BROKER_USER, "-s", "/bin/sh", "-c", command],
            cwd=scratch,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 90
            while rabbitmqctl(node, "await_startup", "--timeout", "5").returncode != 0:
                if server.poll() is not None:
                    output = server.stdout.read() if server.stdout else ""
                    pytest.fail(f"the node did not boot with rabbitmq.conf:\n{output[-3000:]}")
                assert time.monotonic() < deadline, "the private node took over 90 s to boot"
            yield node
        finally:
            rabbitmqctl(node, "stop")
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_node_boots_with_our_settings(private_node: str) -> None:
    assert setting(private_node, "consumer_timeout") == "{ok,7200000}"
    assert setting(private_node, "vm_memory_high_watermark") == "{ok,0.6}"
    assert "2GB" in setting(private_node, "disk_free_limit")
    # What the sender and the consumers assume unless told otherwise (*_BROKER_MAX_MESSAGE_SIZE).
    assert setting(private_node, "max_message_size") == f"{{ok,{DEFAULT_BROKER_MAX_MESSAGE_SIZE}}}"
