"""The local services the stack needs (RabbitMQ, PostgreSQL, MariaDB): where they listen, how to start them.

``python -m tools.services`` and the service-backed tests use this knowledge:
the first starts what is down, the second refuse to run without them and say
which one is down and how to start it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

# What each local service is, where it listens, and how a person starts it on this kind of machine.
SERVICES = {
    "RabbitMQ": (5672, "rabbitmq-server -detached"),
    "PostgreSQL": (5432, "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"),
    "MariaDB": (3306, "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"),
}


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def missing_services(names: list[str] | None = None) -> list[str]:
    """Messages naming each needed service that does not answer, with how to start it."""
    problems = []
    for name in names or list(SERVICES):
        port, how = SERVICES[name]
        if not port_open(port):
            problems.append(f"{name} is not answering on 127.0.0.1:{port}; start it with: {how}")
    return problems


def ensure(names: list[str] | None = None, wait: float = 60.0) -> list[str]:
    """Start each service in ``names`` that is down (when this machine can); the problems left."""
    names = names or list(SERVICES)
    for name in names:
        port, command = SERVICES[name]
        if port_open(port):
            continue
        program = command.split()[0]
        if shutil.which(program) is None:
            continue
        print(f"{name} is down; starting it: {command}", flush=True)
        subprocess.run(command, shell=True, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait
    while missing_services(names) and time.monotonic() < deadline:
        time.sleep(0.5)
    return missing_services(names)
