"""``python -m tools.services``: make sure RabbitMQ, PostgreSQL and MariaDB answer locally.

A service that is down is started with its usual command when this machine
has it; otherwise, or if it still does not answer, this fails and says which
service is down and how to start it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from tools.stack import SERVICES, missing_services, port_open


def ensure(names: list[str] | None = None, wait: float = 60.0) -> list[str]:
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


def main() -> None:
    problems = ensure()
    if problems:
        print("These services are needed and are down:\n  " + "\n  ".join(problems), file=sys.stderr)
        print("(or point RABBITMQ_URL / TEST_POSTGRES_URL / TEST_MYSQL_URL at running ones)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
