"""Reading and checking request bodies the way vLLM's OpenAI server does, in the same order.

vLLM validates field types first, then the model name, then the prompt
length; the first failure is the answer. A ``priority`` is silently ignored
unless the priority policy is on. Messages, types and ``param`` follow vLLM
0.32 (checked against the real server by tests/test_vllm.py) where a client
or proxy might look at them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

from simulator import tokenizer
from simulator.errors import bad_request, invalid_field
from simulator.settings import SimulatorSettings

if TYPE_CHECKING:
    from simulator.served import ServedModels

Kind = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class Generation:
    """A checked chat or completion request, reduced to what the simulator uses."""

    kind: Kind
    model: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    priority: int


def parse_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_field("1", f"valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise invalid_field("", "a valid dictionary or object to extract fields from", data)
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(data: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise invalid_field(name, what, value)
    return value


def check_model(data: dict[str, Any], served: ServedModels) -> str:
    """The name the answer carries (see ``ServedModels.check``); 404 for a name not served."""
    return served.check(_optional(data, "model", str, "a valid string"))


def parse_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_field("messages", "a valid non-empty list", messages)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages.{index}: each message should be an object with a string `role`")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(f"messages.{index}.content: Input should be a valid string or list of parts")
    return messages


def _prompt(data: dict[str, Any]) -> str:
    """A completions prompt as text: a string, token ids, or a batch of exactly one of those."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < 256 for t in prompt):
        text = tokenizer.detokenize(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("prompt: the simulator serves one prompt per request")
    else:
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    if not text:
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    return text


def _max_tokens(data: dict[str, Any], kind: Kind) -> int | None:
    value: int | None = _optional(data, "max_tokens", int, "a valid integer")
    if kind == "chat":
        value = _optional(data, "max_completion_tokens", int, "a valid integer") or value
    if value is not None and value < 1:
        raise bad_request(f"max_tokens must be at least 1, got {value}.", "max_tokens", value)
    return value


def _check_length(prompt_tokens: int, max_tokens: int | None, settings: SimulatorSettings) -> int:
    """The completion length to generate, or vLLM's context-length errors.

    As vLLM 0.32 does, a completion that would not fit after the prompt is
    shortened to fit rather than refused; only a prompt that fills the context
    or a ``max_tokens`` beyond ``max_model_len`` itself is an error.
    """
    limit = settings.max_model_len
    if prompt_tokens >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your prompt contains at "
            f"least {limit + 1} input tokens, which exceeds this limit even without any output tokens. "
            "Please reduce the length of the input prompt.",
            "input_tokens",
            limit + 1,
        )
    if max_tokens is not None and max_tokens > limit:
        raise bad_request(
            f"max_tokens={max_tokens} cannot be greater than max_model_len={limit}. "
            "Please request fewer output tokens.",
            "max_tokens",
            max_tokens,
        )
    wanted = settings.default_max_tokens if max_tokens is None else max_tokens
    return min(wanted, limit - prompt_tokens)


def parse_generation(
    data: dict[str, Any], kind: Kind, settings: SimulatorSettings, served: ServedModels
) -> Generation:
    """Check a chat or completions body; raise the ``ApiError`` vLLM would answer with."""
    prompt = tokenizer.chat_prompt(parse_messages(data)) if kind == "chat" else _prompt(data)
    max_tokens = _max_tokens(data, kind)
    stream = bool(_optional(data, "stream", bool, "a valid boolean"))
    options = _optional(data, "stream_options", dict, "a valid dictionary")
    if options and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    options = options or {}
    include_usage = bool(options.get("include_usage"))
    priority = _optional(data, "priority", int, "a valid integer") or 0
    model = check_model(data, served)
    prompt_tokens = tokenizer.count_tokens(prompt)
    generated = _check_length(prompt_tokens, max_tokens, settings)
    if settings.scheduling_policy != "priority":
        priority = 0  # vLLM ignores it silently then
    return Generation(
        kind=kind,
        model=model,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        max_tokens=generated,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=include_usage and bool(options.get("continuous_usage_stats")),
        priority=priority,
    )


def parse_embedding_inputs(data: dict[str, Any]) -> list[str]:
    """``input`` as a list of texts: a string, strings, token ids, or lists of token ids."""
    value = data.get("input")
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and items and all(_is_int(t) for t in items):
        items = [items]
    if not isinstance(items, list) or not items:
        raise bad_request("input: Field required and should be a string or a list")
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, list) and all(_is_int(t) and 0 <= t < 256 for t in item):
            texts.append(tokenizer.detokenize(item))
        else:
            raise bad_request("input: each item should be a string or a list of token ids (0-255)")
    return texts


def parse_tokenize_prompt(data: dict[str, Any]) -> str:
    """The text ``/tokenize`` counts: a ``prompt``, or ``messages`` through the chat template."""
    if "messages" in data:
        return tokenizer.chat_prompt(parse_messages(data))
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise bad_request("prompt: Field required and should be a valid string")
    return prompt


def parse_token_ids(data: dict[str, Any]) -> list[int]:
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise invalid_field("tokens", "a valid list of integers", tokens)
    if any(not 0 <= t < 256 for t in tokens):
        raise bad_request("Token id out of vocabulary: the simulator's ids are bytes, 0 to 255")
    return tokens
