"""Process set-up shared by the sender and the consumer: settings, garbage collection and JSON logging."""

from __future__ import annotations

import gc
import logging
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError
from pydantic_settings import BaseSettings

_Settings = TypeVar("_Settings", bound=BaseSettings)


def load_settings(kind: type[_Settings], service: str) -> _Settings:
    """The service's settings from the environment, or exit with what is wrong in plain words.

    Pydantic's own message repeats the input, which for a whole-settings check is every variable
    read, database URL and secrets included: only the messages are printed.
    """
    try:
        return kind()
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(part) for part in error["loc"]) + (": " if error["loc"] else "") + error["msg"]
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise SystemExit(f"{service}: invalid configuration: {problems}") from None


def tune_gc() -> None:
    """Make garbage collection rarer and cheaper for a long-running async service.

    Requests allocate many short-lived objects; with CPython's default gen-0
    threshold (700) collections run hundreds of times a second and show up in
    tail latency. Objects alive after start-up are frozen out of collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors (Loki, Elasticsearch, ...) parse without rules.

    Fields passed with ``extra={"fields": {...}}`` are merged into the object.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str) -> None:
    """JSON lines on standard error at ``level``, for this process and the libraries it uses."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
