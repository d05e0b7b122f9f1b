"""Closed-loop traffic that accounts for every request: used by the fault tests and the soak run.

Each client sends completions (streamed and not) one after another and files
every request under one outcome: answered in full, refused or failed with one
of the documented errors, or a defect (hung past its deadline, answered twice
or cut short without an error, an undocumented error).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import orjson

DOCUMENTED_ERRORS = {
    "queue_unavailable",
    "broker_unavailable",
    "model_unavailable",
    "queue_full",
    "overloaded",
    "backend_unavailable",
    "backend_error",
    "stream_interrupted",
}
"""Error codes a client may get while a fault is under way; anything else is a defect.

``deadline_exceeded`` is not among them: the faults injected last a few seconds and
requests have a longer deadline, so a request that reached it waited for nothing."""


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    defects: list[str] = field(default_factory=list)
    slowest: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def add(self, outcome: str, seconds: float, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        self.slowest = max(self.slowest, seconds)
        if outcome.startswith("defect"):
            self.defects.append(f"{outcome}: {detail[:300]}")

    def line(self) -> str:
        parts = ", ".join(f"{name} {count}" for name, count in sorted(self.outcomes.items()))
        return f"{self.total} requests: {parts}; slowest {self.slowest:.1f} s"


async def one_request(
    http: httpx.AsyncClient, model: str, *, stream: bool, max_tokens: int, deadline: float
) -> tuple[str, str]:
    """Send one completion; return (outcome, detail)."""
    body = {"model": model, "prompt": "fault", "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"X-Request-Timeout": str(deadline)}
    try:
        async with asyncio.timeout(deadline + 5):
            if not stream:
                response = await http.post("/v1/completions", json=body, headers=headers)
                return _whole_outcome(response, max_tokens)
            async with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
                raw = await response.aread()
                return _stream_outcome(response.status_code, raw, max_tokens)
    except TimeoutError:
        return "defect:hung", f"no answer {deadline + 5} s after sending (deadline {deadline} s)"
    except httpx.HTTPError as exc:
        return "defect:transport", repr(exc)


def _error_outcome(status: int, raw: bytes) -> tuple[str, str]:
    try:
        code = orjson.loads(raw)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "defect:not-openai-shaped", f"{status} {raw[:200]!r}"
    if code not in DOCUMENTED_ERRORS:
        return "defect:undocumented-error", f"{status} {code}"
    return f"error:{status}:{code}", ""


def _whole_outcome(response: httpx.Response, max_tokens: int) -> tuple[str, str]:
    if response.status_code != 200:
        return _error_outcome(response.status_code, response.content)
    try:
        produced = response.json()["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return "defect:bad-body", response.text[:200]
    if produced != max_tokens:
        return "defect:wrong-length", f"{produced} tokens, asked {max_tokens}"
    return "ok", ""


def _stream_outcome(status: int, raw: bytes, max_tokens: int) -> tuple[str, str]:
    if status != 200:
        return _error_outcome(status, raw)
    pieces = 0
    done = 0
    for event in raw.split(b"\n\n"):
        data = event.removeprefix(b"data: ").strip()
        if not data:
            continue
        if data == b"[DONE]":
            done += 1
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return "defect:bad-event", data[:200].decode(errors="replace")
        if "error" in chunk:
            if done or pieces > max_tokens:
                return "defect:error-after-end", data[:200].decode(errors="replace")
            outcome = _error_outcome(200, data)[0].replace("error:200:", "stream-error:")
            return outcome, f"stream error after {pieces} text events: {data[:200].decode(errors='replace')}"
        if chunk.get("choices"):
            pieces += 1
    if done != 1 or pieces != max_tokens:
        return "defect:wrong-stream", f"{pieces} text events, {done} [DONE], asked {max_tokens}"
    return "ok", ""


async def drive(
    url: str,
    token: str,
    model: str,
    *,
    clients: int,
    until: asyncio.Event,
    tally: Tally,
    max_tokens: int = 20,
    deadline: float = 15.0,
    pause: float = 0.0,
) -> None:
    """Run ``clients`` closed-loop clients until ``until`` is set, filing every request in ``tally``."""

    async def client(number: int) -> None:
        stream = number % 2 == 0
        while not until.is_set():
            started = time.monotonic()
            outcome, detail = await one_request(
                http, model, stream=stream, max_tokens=max_tokens, deadline=deadline
            )
            tally.add(outcome, time.monotonic() - started, detail)
            stream = not stream
            if pause or outcome != "ok":
                await asyncio.sleep(pause or 0.05)  # a refused client backs off a little

    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=None, limits=limits
    ) as http:
        await asyncio.gather(*(client(n) for n in range(clients)))
