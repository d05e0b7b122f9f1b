"""``python -m sender.admin``: manage the token database.

Commands: migrate, schema-version, add-token, set-token, revoke-token,
list-tokens, usage. ``--help`` after any command says more. Tables are
printed for people; ``--json`` prints JSON for scripts. A generated secret
is printed once, when the token is made, and is never stored or shown again.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from contract import DEFAULT_MAX_PRIORITY
from sender import token_records
from sender.database import DatabaseUrlError, create_engine
from sender.migrate import migrate, schema_version
from sender.settings import SenderSettings
from sender.token_records import UNSET, TokenFields
from sender.tokens import parse_models

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


WHEN_FORMATS = (
    "a date (2027-01-01), a date and time in the database's local time (2027-01-01 12:00, "
    "2027-01-01T12:00:00) or a duration (30d, 12h, 90m, 45s)"
)


def _integer(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None


def _priority(text: str) -> int:
    """0 to the sender's scale (``SENDER_MAX_PRIORITY``): a larger one would be stored and served lower."""
    top = _max_priority()
    what = f"the priority must be an integer from 0 to {top} (SENDER_MAX_PRIORITY; higher is served first)"
    value = _integer(text, what)
    if not 0 <= value <= top:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def _max_priority() -> int:
    try:
        return SenderSettings().max_priority
    except ValueError:
        return DEFAULT_MAX_PRIORITY


def _threshold(text: str) -> int:
    """At least 1: a threshold of 0 or less refuses every request, whatever the queue."""
    what = "the threshold must be an integer of at least 1 (the queue depth at which requests get 429)"
    value = _integer(text, what)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def _positive_or_none(what: str) -> Callable[[str], int | None]:
    """A parser of a positive whole number, or none (no limit); 0 or less would refuse everything.
    ``what`` is the error message's start."""

    def parse(text: str) -> int | None:
        if text.strip().lower() == "none":
            return None
        value = _integer(text, what)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value

    return parse


_per_minute = _positive_or_none("the limit must be a positive integer per minute, or none for no limit")
_parallel = _positive_or_none(
    "max-parallel must be a positive integer (requests queued or running at once), or none"
)


def _optional_seconds(text: str) -> float | None:
    """A positive number of seconds, or none; the database refuses the rest too, less clearly."""
    if text.strip().lower() == "none":
        return None
    what = "max-seconds must be a positive number of seconds, or none for the server's deadline"
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return seconds


def _models(text: str) -> list[str] | None:
    return None if text.lower() == "none" else parse_models(text)


def _point(text: str) -> str:
    """A date, date and time, or duration, checked now; kept as text until the database's clock is
    known (durations count from its now)."""
    if not _DURATION.match(text):
        try:
            dt.datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {WHEN_FORMATS}, got {text!r}") from None
    return text


def _when(text: str) -> str | None:
    """As :func:`_point`, or none (never expires)."""
    if text.strip().lower() == "none":
        return None
    try:
        return _point(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected {WHEN_FORMATS}, or none, got {text!r}") from None


async def _resolve_when(engine: AsyncEngine, text: str | None, *, ago: bool = False) -> dt.datetime | None:
    """A date or time is taken as it is; a duration (``30d``) counts from the database's clock,
    forwards (``--expires 30d``) or, with ``ago``, backwards (``--since 2h``)."""
    if text is None:
        return None
    match = _DURATION.match(text)
    if match is None:
        return dt.datetime.fromisoformat(text)
    delta = dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    return await token_records.database_now(engine) + (-delta if ago else delta)


def _read_secret(path: str) -> str:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    secret = text.strip()
    if not secret:
        raise SystemExit(f"the secret file {path} is empty")
    return secret


def _print(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(none)")
        return
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


async def _run(args: argparse.Namespace) -> int:
    try:
        engine = create_engine(args.database_url or SenderSettings().database_url)
    except DatabaseUrlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return await _command(engine, args)
    except token_records.InvalidTokenField as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await engine.dispose()


async def _command(engine: AsyncEngine, args: argparse.Namespace) -> int:
    if args.command in ("migrate", "init-db"):
        applied = await migrate(engine, args.scripts_dir)
        version = await schema_version(engine)
        print(f"schema version {version}" + (f" (applied {applied})" if applied else " (already current)"))
    elif args.command == "schema-version":
        print(await schema_version(engine))
    elif args.command == "add-token":
        fields = TokenFields(
            owner=args.owner,
            priority=args.priority,
            threshold=args.threshold,
            expires_at=await _resolve_when(engine, args.expires),
            models=args.models,
            rpm=args.rpm,
            tpm=args.tpm,
            max_seconds=args.max_seconds,
            max_parallel=args.max_parallel,
        )
        given = _read_secret(args.secret_file) if args.secret_file else None
        pepper = SenderSettings().pepper()
        if pepper is None and given is not None:
            print(
                "warning: no SENDER_TOKEN_PEPPER(_FILE): the secret is stored as a plain SHA-256, "
                "which guesses can be tested against; a pepper is strongly recommended",
                file=sys.stderr,
            )
        secret = await token_records.add_token(engine, args.name, secret=given, fields=fields, pepper=pepper)
        if given is None:  # a generated secret is shown now or never
            print(json.dumps({"name": args.name, "secret": secret}) if args.json else secret)
        elif args.json:
            print(json.dumps({"name": args.name}))
    elif args.command == "set-token":
        changes = {
            "owner": args.owner,
            "priority": args.priority,
            "threshold": args.threshold,
            "enabled": args.enabled,
            "models": args.models,
            "rpm": args.rpm,
            "tpm": args.tpm,
            "max_seconds": args.max_seconds,
            "max_parallel": args.max_parallel,
            "expires_at": UNSET if args.expires is UNSET else await _resolve_when(engine, args.expires),
        }
        if not await token_records.set_token(engine, args.name, **changes):
            print(f"no token named {args.name}", file=sys.stderr)
            return 1
    elif args.command == "revoke-token":
        if not await token_records.revoke_token(engine, args.name):
            print(f"no token named {args.name}", file=sys.stderr)
            return 1
    elif args.command == "list-tokens":
        _print(await token_records.list_tokens(engine), args.json)
    elif args.command == "usage":
        rows = await token_records.usage_report(
            engine,
            since=await _resolve_when(engine, args.since, ago=True),
            until=await _resolve_when(engine, args.until, ago=True),
            name=args.name,
        )
        _print(rows, args.json)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m sender.admin", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    root.add_argument("--database-url", help="defaults to DATABASE_URL")
    commands = root.add_subparsers(dest="command", required=True, metavar="command")

    migrate_cmd = commands.add_parser(
        "migrate", help="apply the db-init schema scripts this database lacks (safe to repeat)"
    )
    init_cmd = commands.add_parser("init-db", help="the same as migrate")
    for command in (migrate_cmd, init_cmd):
        command.add_argument(
            "--scripts-dir", type=Path, help="the db-init folder (default: DB_INIT_DIR or ./db-init)"
        )
    commands.add_parser("schema-version", help="print the schema version of the database (0: empty)")

    add = commands.add_parser(
        "add-token",
        help="create a token (or replace the one of the same name); prints a generated secret once",
        description="Create a token, or replace the one of the same name (new secret, fields as given). "
        "Without --secret-file a strong secret (sk-...) is generated and printed once: it is not stored.",
    )
    add.add_argument("--name", required=True)
    add.add_argument(
        "--priority",
        type=_priority,
        default=0,
        help=f"higher is served first, 0-{DEFAULT_MAX_PRIORITY} (SENDER_MAX_PRIORITY; default 0)",
    )
    add.add_argument(
        "--threshold", type=_threshold, default=100, help="queue depth at which requests get 429 (>= 1)"
    )
    add.add_argument("--owner", help="person or team, for reports")
    add.add_argument(
        "--expires", type=_when, help="date, date and time (database local time) or a duration: 30d, 12h"
    )
    add.add_argument("--models", type=_models, help="comma-separated models it may use (default: all)")
    add.add_argument("--rpm", type=_per_minute, help="requests per minute, > 0 (default: no limit)")
    add.add_argument("--tpm", type=_per_minute, help="tokens per minute, > 0 (default: no limit)")
    add.add_argument(
        "--max-seconds",
        type=_optional_seconds,
        help="seconds a request may take at most, below SENDER_DEADLINE_SECONDS (default: that)",
    )
    add.add_argument(
        "--max-parallel",
        type=_parallel,
        help="requests queued or running at once, > 0, per sender replica (default: no limit)",
    )
    add.add_argument("--secret-file", help="read the secret from this file ('-': standard input)")
    add.add_argument("--json", action="store_true", help="print {name, secret} as JSON")

    change = commands.add_parser(
        "set-token",
        help="change some fields of a token",
        description="Change the fields given; the others stay. "
        "'none' clears --expires, --models, --rpm, --tpm, --max-seconds, --max-parallel.",
    )
    change.add_argument("--name", required=True)
    change.add_argument("--priority", type=_priority, default=UNSET, help="0 to SENDER_MAX_PRIORITY")
    change.add_argument("--threshold", type=_threshold, default=UNSET, help="at least 1")
    change.add_argument("--owner", default=UNSET)
    change.add_argument("--expires", type=_when, default=UNSET, help="date/time, duration (30d) or none")
    change.add_argument("--models", type=_models, default=UNSET, help="comma-separated, or none for all")
    change.add_argument("--rpm", type=_per_minute, default=UNSET, help="a number, or none")
    change.add_argument("--tpm", type=_per_minute, default=UNSET, help="a number, or none")
    change.add_argument(
        "--max-seconds", type=_optional_seconds, default=UNSET, help="seconds (> 0), or none for the server's"
    )
    change.add_argument("--max-parallel", type=_parallel, default=UNSET, help="a number, or none")
    enabled = change.add_mutually_exclusive_group()
    enabled.add_argument("--enable", dest="enabled", action="store_true", default=UNSET)
    enabled.add_argument("--disable", dest="enabled", action="store_false")

    revoke = commands.add_parser(
        "revoke-token",
        help="disable a token (it stops working within SENDER_TOKEN_CACHE_SECONDS)",
        description="Disable a token; its row and usage stay, and set-token --enable turns it back on.",
    )
    revoke.add_argument("--name", required=True)

    listing = commands.add_parser("list-tokens", help="list tokens (never secrets, only a hash prefix)")
    listing.add_argument("--json", action="store_true")

    usage = commands.add_parser("usage", help="requests and tokens per token and model over a time range")
    usage.add_argument(
        "--since", type=_point, help="date/time (database local time) or a duration ago: 2h, 7d (default 1d)"
    )
    usage.add_argument("--until", type=_point, help="date/time or a duration ago (default: now)")
    usage.add_argument("--name", help="one token only")
    usage.add_argument("--json", action="store_true")
    return root


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    raise SystemExit(asyncio.run(_run(args)))


if __name__ == "__main__":
    main()
