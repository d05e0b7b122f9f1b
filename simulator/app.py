"""The ASGI application: a dict lookup on the path, then the handler; nothing else on the way.

Endpoints and answers follow vLLM's OpenAI server. Generation goes through the
``Engine`` so that batch limits, queueing and per-token timing look like a
GPU's; a client that disconnects frees its slot at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from simulator import responses, tokenizer
from simulator.asgi import (
    DisconnectWatch,
    Receive,
    Scope,
    Send,
    read_body,
    send_bytes,
    send_event,
    send_json,
    start_stream,
)
from simulator.engine import Engine, Sequence
from simulator.errors import ApiError, bad_request
from simulator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from simulator.metrics import MetricsRenderer
from simulator.request_checks import (
    Generation,
    check_model,
    parse_embedding_inputs,
    parse_generation,
    parse_object,
    parse_token_ids,
    parse_tokenize_prompt,
)
from simulator.served import ServedModels, parse_lora_modules, split_names
from simulator.settings import SimulatorSettings

Handler = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

# What FastAPI (and so vLLM) answers for an unknown path or a wrong method.
NOT_FOUND = b'{"detail":"Not Found"}'
METHOD_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'


class Simulator:
    """A fake vLLM OpenAI server for one model."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.engine = Engine(
            max_num_seqs=settings.max_num_seqs,
            ttft=settings.ttft_ms / 1000,
            itl=settings.itl_ms / 1000,
            priority_policy=settings.scheduling_policy == "priority",
        )
        self.served = ServedModels(
            [settings.model, *split_names(settings.aliases)],
            settings.root,
            settings.max_model_len,
            parse_lora_modules(settings.lora_modules),
        )
        self.metrics = MetricsRenderer(self.engine, settings.model)
        self.routes: dict[str, tuple[str, Handler]] = {
            "/health": ("GET", self.health),
            "/metrics": ("GET", self.prometheus),
            "/v1/models": ("GET", self.models),
            "/v1/chat/completions": ("POST", self.chat),
            "/v1/completions": ("POST", self.completions),
            "/v1/embeddings": ("POST", self.embeddings),
            "/tokenize": ("POST", self.tokenize),
            "/detokenize": ("POST", self.detokenize),
        }
        if settings.allow_runtime_lora_updating:
            self.routes["/v1/load_lora_adapter"] = ("POST", self.load_lora_adapter)
            self.routes["/v1/unload_lora_adapter"] = ("POST", self.unload_lora_adapter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await lifespan(receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"])
        if route is None:
            await send_bytes(send, 404, NOT_FOUND)
            return
        method, handler = route
        if scope["method"] != method:
            await send_bytes(send, 405, METHOD_NOT_ALLOWED, extra_headers=[(b"allow", method.encode())])
            return
        try:
            data = parse_object(await read_body(receive)) if method == "POST" else {}
            await handler(data, receive, send)
        except ApiError as error:
            await send_bytes(send, error.status, error.body())

    async def health(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        if self.settings.health_delay_ms and self.engine.running:
            await asyncio.sleep(self.settings.health_delay_ms / 1000)
        await send_bytes(send, 200, b"", content_type=None)

    async def prometheus(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, self.metrics.render(), METRICS_CONTENT_TYPE)

    async def models(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        await send_json(send, 200, self.served.listing())

    async def load_lora_adapter(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        name, path = _text_field(data, "lora_name"), _text_field(data, "lora_path")
        self.served.load(name, path)
        await send_bytes(
            send,
            200,
            f"Success: LoRA adapter '{name}' added successfully.".encode(),
            b"text/plain; charset=utf-8",
        )

    async def unload_lora_adapter(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        name = _text_field(data, "lora_name")
        self.served.unload(name)
        await send_bytes(
            send,
            200,
            f"Success: LoRA adapter '{name}' removed successfully.".encode(),
            b"text/plain; charset=utf-8",
        )

    async def chat(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        await self.generate(parse_generation(data, "chat", self.settings, self.served), receive, send)

    async def completions(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        await self.generate(parse_generation(data, "completion", self.settings, self.served), receive, send)

    async def generate(self, generation: Generation, receive: Receive, send: Send) -> None:
        answer = responses.Answer(generation)
        sequence = self.engine.sequence(generation.prompt_tokens, generation.max_tokens, generation.priority)
        seed = tokenizer.seed(generation.prompt)
        if generation.stream:
            await self.stream(sequence, answer, seed, receive, send)
            return
        with DisconnectWatch(receive) as watch:
            async with sequence:
                await sequence.run()
        if not watch.gone:
            text = tokenizer.completion(seed, generation.max_tokens)
            await send_json(send, 200, answer.full(text, generation.max_tokens))

    async def stream(
        self, sequence: Sequence, answer: responses.Answer, seed: int, receive: Receive, send: Send
    ) -> None:
        """Send each token as its own event the moment it is generated."""
        with DisconnectWatch(receive):
            await start_stream(send)
            async with sequence, aclosing(sequence.stream()) as tokens:
                async for index in tokens:
                    produced = index + 1
                    text = tokenizer.piece(seed, index)
                    chunk = answer.token_chunk(text, produced, last=produced == sequence.max_tokens)
                    await send_event(send, answer.first_chunks() + chunk if index == 0 else chunk)
            await send_event(send, answer.closing_chunks(sequence.max_tokens), more=False)

    async def embeddings(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        texts = parse_embedding_inputs(data)
        encoding_format = data.get("encoding_format") or "float"
        if encoding_format not in ("float", "base64"):
            raise bad_request("encoding_format: Input should be 'float' or 'base64'")
        model = check_model(data, self.served)
        await send_json(send, 200, responses.embeddings(model, texts, encoding_format))

    async def tokenize(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        prompt = parse_tokenize_prompt(data)
        check_model(data, self.served)
        tokens = tokenizer.tokenize(prompt)
        answer = {
            "count": len(tokens),
            "max_model_len": self.settings.max_model_len,
            "tokens": tokens,
            "token_strs": None,
        }
        await send_json(send, 200, answer)

    async def detokenize(self, data: dict[str, Any], receive: Receive, send: Send) -> None:
        tokens = parse_token_ids(data)
        check_model(data, self.served)
        await send_json(send, 200, {"prompt": tokenizer.detokenize(tokens)})


def _text_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{name} must be a non-empty string", name)
    return value


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown; there is nothing to set up or tear down."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_app(settings: SimulatorSettings | None = None) -> Simulator:
    return Simulator(settings or SimulatorSettings())
