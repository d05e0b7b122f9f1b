"""The JSON objects vLLM's OpenAI server answers with, field for field.

The keys are vLLM 0.32's, checked against the real server by
tests/test_vllm.py: chunks carry only the fields vLLM sets, the usage chunk
has just the three counts and the system fingerprint, so a client or proxy
sees the same keys as from vLLM.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import struct
import time
from typing import Any

import orjson

from simulator.request_checks import Generation

EMBEDDING_DIMENSION = 8
DONE = b"data: [DONE]\n\n"
SYSTEM_FINGERPRINT = "vllm-0.32.0-simulator"
"""vLLM 0.32 names its version (and a hash of its configuration) here."""


def random_id() -> str:
    return secrets.token_hex(16)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The usage of a whole answer; a stream's usage chunk has only the three counts."""
    return {
        **counts(prompt_tokens, completion_tokens),
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def counts(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def event(content: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(content) + b"\n\n"


class Answer:
    """Builds one request's answer: the whole object, or its stream of chunks."""

    __slots__ = ("created", "generation", "id")

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        prefix = "chatcmpl-" if generation.kind == "chat" else "cmpl-"
        self.id = prefix + random_id()
        self.created = int(time.time())

    def full(self, text: str, completion_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any]
        chat = self.generation.kind == "chat"
        if chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            }
            choice = {"index": 0, "message": message, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice.update(finish_reason="length", stop_reason=None, token_ids=None)
        if not chat:
            choice.update(prompt_logprobs=None, prompt_token_ids=None)
        choice["routed_experts"] = None
        answer = {
            "id": self.id,
            "object": "chat.completion" if chat else "text_completion",
            "created": self.created,
            "model": self.generation.model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage(self.generation.prompt_tokens, completion_tokens),
        }
        if chat:
            answer.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        answer.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return answer

    def _chunk(self, choices: list[dict[str, Any]], produced: int | None, **extra: Any) -> bytes:
        chat = self.generation.kind == "chat"
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.generation.model,
            "choices": choices,
        }
        if produced is not None:
            chunk["usage"] = counts(self.generation.prompt_tokens, produced)
            if chat:
                chunk["usage"]["completion_tokens_details"] = None
        chunk.update(extra)
        return event(chunk)

    def first_chunks(self) -> bytes:
        """What precedes the first token: the assistant role for a chat, nothing for a completion."""
        if self.generation.kind != "chat":
            return b""
        delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        produced = 0 if self.generation.continuous_usage else None
        return self._chunk([choice], produced, prompt_token_ids=None, prompt_text=None)

    def token_chunk(self, text: str, produced: int, last: bool) -> bytes:
        choice: dict[str, Any]
        if self.generation.kind == "chat":
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
            if last:
                choice.update(finish_reason="length", stop_reason=None)
            choice["token_ids"] = None
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            choice.update(finish_reason="length" if last else None, stop_reason=None)
            choice.update(prompt_token_ids=None, token_ids=None)
        # Without a usage chunk to carry it, the last token's chunk names the system.
        extra = (
            {"system_fingerprint": SYSTEM_FINGERPRINT} if last and not self.generation.include_usage else {}
        )
        return self._chunk([choice], produced if self.generation.continuous_usage else None, **extra)

    def closing_chunks(self, produced: int) -> bytes:
        """The usage chunk when asked for, then ``[DONE]``."""
        if not self.generation.include_usage:
            return DONE
        usage_chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.generation.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.generation.model,
            "choices": [],
            "usage": counts(self.generation.prompt_tokens, produced),
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return event(usage_chunk) + DONE


def embedding(text: str) -> list[float]:
    """A unit vector that depends only on the text."""
    digest = hashlib.blake2b(text.encode(), digest_size=4 * EMBEDDING_DIMENSION).digest()
    values = struct.unpack(f"<{EMBEDDING_DIMENSION}i", digest)
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def embeddings(model: str, texts: list[str], encoding_format: str) -> dict[str, Any]:
    data = []
    for index, text in enumerate(texts):
        vector: list[float] | str = embedding(text)
        if encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{EMBEDDING_DIMENSION}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": vector})
    prompt_tokens = sum(len(text.encode()) for text in texts)
    return {
        "id": "embd-" + random_id(),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": {**counts(prompt_tokens, 0), "prompt_tokens_details": None},
    }
