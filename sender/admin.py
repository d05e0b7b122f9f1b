"""``python -m sender.admin``: create the token table and add tokens.

The full token life cycle lives in ``db-init/``; this is what ``make run`` and
the tests use to get a working token.
"""

from __future__ import annotations

import argparse
import asyncio

from sqlalchemy.ext.asyncio import create_async_engine

from sender.app import async_database_url
from sender.settings import SenderSettings
from sender.tokens import add_token, create_schema


async def _run(args: argparse.Namespace) -> None:
    engine = create_async_engine(async_database_url(args.database_url or SenderSettings().database_url))
    try:
        await create_schema(engine)
        if args.command == "add-token":
            secret = await add_token(
                engine, args.name, secret=args.secret, priority=args.priority, threshold=args.threshold
            )
            print(secret)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sender.admin", description=__doc__)
    parser.add_argument("--database-url", help="defaults to DATABASE_URL")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init-db", help="create the token table if it is missing")
    add = commands.add_parser("add-token", help="add (or replace) a token and print its secret once")
    add.add_argument("--name", required=True)
    add.add_argument("--priority", type=int, default=0, help="higher is served first (0-9)")
    add.add_argument("--threshold", type=int, default=100, help="queue depth at which requests get 429")
    add.add_argument("--secret", help="use this secret instead of generating one")
    asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
