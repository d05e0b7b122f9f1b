"""Token counts read from the backend's answers, for the consumer's metrics and the sender's accounting.

Only the ``usage`` object the backend itself reports is trusted: the whole
body of a plain answer, or the usage chunk that ends a stream
(``stream_options.include_usage``). The consumer asks for that chunk even when
the client did not (``consumer/backend_body.py``); :class:`StreamUsage` then
removes it from the client's stream, which stays as vLLM would have sent it.
"""

from __future__ import annotations

import orjson

TAIL_BYTES = 4096
"""How much of the end of a stream is kept to find its usage chunk."""


def from_body(body: bytes) -> tuple[int, int] | None:
    """(prompt tokens, completion tokens) of a JSON answer, if it reports them."""
    try:
        usage = orjson.loads(body).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return _counts(usage)


def from_stream_tail(tail: bytes) -> tuple[int, int] | None:
    """The usage reported by the last event that has one, in the end of an event stream."""
    for event in reversed(tail.split(b"\n\n")):
        if b'"usage"' not in event or not event.startswith(b"data: {"):
            continue
        try:
            counts = _counts(orjson.loads(event[6:]).get("usage"))
        except orjson.JSONDecodeError:
            continue
        if counts is not None:
            return counts
    return None


def carries_token(data: bytes) -> bool:
    """Whether ``data`` (whole events of a stream) holds more than the chat role's opening events.

    vLLM opens a chat stream with one event per choice that only names the
    ``assistant`` role (empty content); the first token may follow in a later
    read. Counting is enough to tell them apart: no JSON is parsed on the hot path.
    """
    return data.count(b"data: ") > data.count(_ROLE_ONLY)


_ROLE_ONLY = b'"delta":{"role":"assistant","content":""}'


def _counts(usage: object) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int):
        return None
    return prompt, completion if isinstance(completion, int) else 0


class StreamUsage:
    """Finds the usage of a streamed answer as it passes, and removes it when the client did not ask.

    With ``strip``, events are relayed whole: a partial event waits for its end
    (vLLM writes whole events, so nothing waits in practice). The usage chunk
    (empty ``choices`` and a ``usage`` object) is dropped, and so is the
    ``"usage":null`` vLLM adds to chat chunks once usage is asked for.
    Without ``strip`` the stream passes untouched and only its tail is kept.
    """

    def __init__(self, *, strip: bool) -> None:
        self._strip = strip
        self._pending = b""
        self._tail = b""
        self._finishing: bytes | None = None
        """The chunk that ends a choice, held until the usage chunk: vLLM sends its
        ``system_fingerprint`` on the usage chunk when usage was asked for, else on this one."""
        self.counts: tuple[int, int] | None = None

    def feed(self, data: bytes) -> bytes:
        if not self._strip:
            self._tail = (self._tail + data)[-TAIL_BYTES:]
            return data
        self._pending += data
        cut = self._pending.rfind(b"\n\n")
        if cut < 0:
            return b""
        complete, self._pending = self._pending[: cut + 2], self._pending[cut + 2 :]
        kept = []
        for event in complete.split(b"\n\n")[:-1]:
            if b'"usage":{' in event and b'"choices":[]' in event:
                self.counts = from_stream_tail(event) or self.counts
                if self._finishing is not None:
                    self._finishing = _with_fingerprint(self._finishing, event)
                continue
            if self._finishing is not None:
                kept.append(self._finishing + b"\n\n")
                self._finishing = None
            if b'"chat.completion.chunk"' in event:
                event = event.replace(b',"usage":null', b"")
            if b'"finish_reason":"' in event:
                self._finishing = event
                continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def end(self) -> bytes:
        """What is left at the end of the stream (an unterminated event, relayed as it is)."""
        if not self._strip:
            self.counts = from_stream_tail(self._tail)
            return b""
        held = b"" if self._finishing is None else self._finishing + b"\n\n"
        rest, self._pending, self._finishing = self._pending, b"", None
        return held + rest


def _with_fingerprint(event: bytes, usage_event: bytes) -> bytes:
    """``event`` with the usage chunk's ``system_fingerprint``, where vLLM puts it without usage."""
    try:
        fingerprint = orjson.loads(usage_event[len(b"data: ") :]).get("system_fingerprint")
    except (orjson.JSONDecodeError, AttributeError):
        return event
    if fingerprint is None or b'"system_fingerprint"' in event or not event.endswith(b"}"):
        return event
    return event[:-1] + b',"system_fingerprint":' + orjson.dumps(fingerprint) + b"}"
