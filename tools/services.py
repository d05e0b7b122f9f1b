"""``python -m tools.services``: make sure RabbitMQ, PostgreSQL and MariaDB answer locally.

A service that is down is started with its usual command when this machine
has it; otherwise, or if it still does not answer, this fails and says which
service is down and how to start it.
"""

from __future__ import annotations

import sys

from harness.services import ensure


def main() -> None:
    problems = ensure()
    if problems:
        print("These services are needed and are down:\n  " + "\n  ".join(problems), file=sys.stderr)
        print("(or point RABBITMQ_URL / TEST_POSTGRES_URL / TEST_MYSQL_URL at running ones)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
