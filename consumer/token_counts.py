"""Token counts read from the backend's answers, for the consumer's metrics and the sender's accounting.

The ``usage`` object the backend itself reports is what counts: the whole
body of a plain answer, or the usage chunk that ends a stream
(``stream_options.include_usage``). The consumer asks for that chunk even when
the client did not (``consumer/backend_body.py``); :class:`StreamUsage` then
removes it from the client's stream, which stays as vLLM would have sent it.

A stream cut before its usage chunk (client gone, deadline, backend failure,
shutdown) is still charged: :class:`StreamUsage` counts the events that carry
generated tokens as they pass (vLLM sends one event per token and choice),
so the completion tokens produced up to the cut are known. The prompt's are
then asked of the backend's ``/tokenize`` (:func:`tokenize_body`): the
backend processed the prompt whatever became of the answer. A plain answer
cut before it arrived is charged its prompt only: what it generated is not
knowable.
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


_TOKENIZE_FIELDS = {
    "/v1/completions": ("model", "prompt", "add_special_tokens"),
    "/v1/chat/completions": (
        "model",
        "messages",
        "tools",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "chat_template",
        "chat_template_kwargs",
    ),
}
"""The fields of a request that decide its prompt's tokens, by route, as vLLM's ``/tokenize`` takes them."""


def tokenize_body(path: str, body: bytes) -> bytes | None:
    """What to ask the backend's ``/tokenize`` to learn the prompt tokens of a request (None: nothing
    to ask, e.g. a list of prompts, which ``/tokenize`` does not take)."""
    fields = _TOKENIZE_FIELDS.get(path)
    if fields is None:
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or ("prompt" in fields and not isinstance(payload.get("prompt"), str)):
        return None
    return orjson.dumps({key: payload[key] for key in fields if key in payload})


def count_of(answer: bytes) -> int | None:
    """The ``count`` of a ``/tokenize`` answer."""
    try:
        count = orjson.loads(answer).get("count")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


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


Counts = tuple[int | None, int]
"""(prompt tokens, completion tokens); the prompt's are None when unknown (a stream cut short)."""

_ROLE_ONLY = b'"delta":{"role":"assistant","content":""}'
"""The chat stream's first event: it names the role and carries no token."""


def _carries_token(event: bytes) -> bool:
    return event.startswith(b"data: {") and b'"choices":[]' not in event and _ROLE_ONLY not in event


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
        self.events = 0
        """Events that carried generated tokens so far: the completion tokens of a stream cut short."""
        self._tail = b""
        self._finishing: bytes | None = None
        """The chunk that ends a choice, held until the usage chunk: vLLM sends its
        ``system_fingerprint`` on the usage chunk when usage was asked for, else on this one."""
        self.counts: tuple[int, int] | None = None

    def so_far(self) -> Counts:
        """What the stream used: the backend's usage once it came, else the tokens counted up to now."""
        return self.counts if self.counts is not None else (None, self.events)

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        cut = self._pending.rfind(b"\n\n")
        if cut < 0:
            if not self._strip:
                self._tail = (self._tail + data)[-TAIL_BYTES:]
                return data
            return b""
        complete, self._pending = self._pending[: cut + 2], self._pending[cut + 2 :]
        events = complete.split(b"\n\n")[:-1]
        if not self._strip:
            self.events += sum(1 for event in events if _carries_token(event))
            self._tail = (self._tail + data)[-TAIL_BYTES:]
            return data
        kept = []
        for event in events:
            if _carries_token(event):
                self.events += 1
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
