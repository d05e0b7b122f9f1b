"""The JSON objects vLLM's OpenAI server answers with, field for field.

Chat chunks carry only the fields vLLM sets (it serialises them with
``exclude_unset``), completion chunks carry all of theirs (``usage: null``
included), so a client or proxy sees the same keys as from vLLM.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import struct
import time
from typing import Any

import orjson

from simulator.protocol import Generation

EMBEDDING_DIMENSION = 8
DONE = b"data: [DONE]\n\n"


def random_id() -> str:
    return secrets.token_hex(16)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def event(content: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(content) + b"\n\n"


class Reply:
    """Builds one request's answer: the whole object, or its stream of chunks."""

    __slots__ = ("created", "generation", "id")

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        prefix = "chatcmpl-" if generation.kind == "chat" else "cmpl-"
        self.id = prefix + random_id()
        self.created = int(time.time())

    def full(self, text: str, completion_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.generation.kind == "chat":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            }
            choice = {"index": 0, "message": message, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            obj = "text_completion"
        choice.update(finish_reason="length", stop_reason=None)
        if self.generation.kind == "completion":
            choice["prompt_logprobs"] = None
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.generation.model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(self.generation.prompt_tokens, completion_tokens),
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }

    def _chunk(self, choices: list[dict[str, Any]], produced: int | None) -> bytes:
        chat = self.generation.kind == "chat"
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.generation.model,
            "choices": choices,
        }
        if produced is not None:
            chunk["usage"] = usage(self.generation.prompt_tokens, produced)
        elif not chat:
            chunk["usage"] = None
        return event(chunk)

    def first_chunks(self) -> bytes:
        """What precedes the first token: the assistant role for a chat, nothing for a completion."""
        if self.generation.kind != "chat":
            return b""
        delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._chunk([choice], 0 if self.generation.continuous_usage else None)

    def token_chunk(self, text: str, produced: int, last: bool) -> bytes:
        choice: dict[str, Any]
        if self.generation.kind == "chat":
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
            if last:
                choice.update(finish_reason="length", stop_reason=None)
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            choice.update(finish_reason="length" if last else None, stop_reason=None)
        return self._chunk([choice], produced if self.generation.continuous_usage else None)

    def closing_chunks(self, produced: int) -> bytes:
        """The usage chunk when asked for, then ``[DONE]``."""
        if not self.generation.include_usage:
            return DONE
        return self._chunk([], produced) + DONE


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
        "usage": usage(prompt_tokens, 0),
    }


def models(model: str, max_model_len: int) -> dict[str, Any]:
    created = int(time.time())
    permission = {
        "id": "modelperm-" + random_id(),
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
    return {"object": "list", "data": [card]}
