"""A toy tokenizer that is exact, invertible and nearly free.

Prompt token ids are the UTF-8 bytes of the text, so counts are predictable in
tests and ``/tokenize`` then ``/detokenize`` gives the text back. Generated
text is a fixed cycle of words, one word per completion token, so a streamed
answer and a non-streamed one to the same request read the same.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from typing import Any

VOCABULARY = (
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
)
# Every word after the first is preceded by a space, so the pieces concatenate to the text.
_PIECES = tuple(" " + word for word in VOCABULARY)


def tokenize(text: str) -> list[int]:
    return list(text.encode())


def count_tokens(text: str) -> int:
    return len(text.encode())


def detokenize(ids: Sequence[int]) -> str:
    return bytes(ids).decode(errors="replace")


def content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, null, or a list of OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The prompt a chat turns into, in the spirit of a chat template with a generation prompt."""
    turns = [f"<|{message['role']}|>\n{content_text(message.get('content'))}\n" for message in messages]
    return "".join(turns) + "<|assistant|>\n"


def seed(prompt: str) -> int:
    """Where in the vocabulary a completion starts; a function of the prompt only."""
    return zlib.crc32(prompt.encode())


def piece(seed: int, index: int) -> str:
    """The text of completion token ``index``."""
    position = (seed + index) % len(VOCABULARY)
    return VOCABULARY[position] if index == 0 else _PIECES[position]


def completion(seed: int, count: int) -> str:
    return _completion(seed % len(VOCABULARY), count)


@functools.lru_cache(maxsize=1024)
def _completion(start: int, count: int) -> str:
    return "".join(piece(start, index) for index in range(count))
