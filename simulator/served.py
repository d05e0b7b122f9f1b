"""The names the simulator answers to, listed by ``/v1/models`` the way vLLM lists them.

vLLM serves its model under every ``--served-model-name`` (aliases, each listed
with ``root`` the model's path) and each LoRA adapter of ``--lora-modules``
under the adapter's name (listed with ``root`` the adapter's path and
``parent`` the first served name). Adapters may be loaded and unloaded at run
time (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), which is what a
dispatcher in front must follow.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Any

from simulator.errors import ApiError, model_not_found
from simulator.responses import random_id


def split_names(text: str) -> list[str]:
    """Names separated by spaces or commas, as an operator writes a list in one variable."""
    return [name for name in text.replace(",", " ").split() if name]


def parse_lora_modules(text: str) -> dict[str, str]:
    """``name=path`` pairs, as vLLM's ``--lora-modules``; a bare name is its own path."""
    modules: dict[str, str] = {}
    for item in split_names(text):
        name, _, path = item.partition("=")
        modules[name] = path or name
    return modules


class ServedModels:
    """The base model's names and the adapters loaded now."""

    def __init__(self, names: list[str], root: str, max_model_len: int, adapters: dict[str, str]) -> None:
        self.names = list(dict.fromkeys(names))
        self.root = root or self.names[0]
        self.max_model_len = max_model_len
        self.adapters = dict(adapters)

    @property
    def primary(self) -> str:
        return self.names[0]

    def check(self, model: str | None) -> str:
        """The name an answer to a request for ``model`` carries, as vLLM's: an adapter's own, the
        primary name for an alias or no name at all; 404 if the name is not served."""
        if model is None or model in self.names:
            return self.primary
        if model in self.adapters:
            return model
        raise model_not_found(model, ", ".join(self.names))  # vLLM names no adapter there

    def load(self, name: str, path: str) -> None:
        if name in self.adapters or name in self.names:
            message = f"The lora adapter '{name}' has already been loaded."
            raise ApiError(HTTPStatus.BAD_REQUEST, message, "InvalidUserInput", "lora_name")
        self.adapters[name] = path

    def unload(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            message = f"The lora adapter '{name}' cannot be found."
            raise ApiError(HTTPStatus.NOT_FOUND, message, "NotFoundError", "lora_name")

    def listing(self) -> dict[str, Any]:
        """``/v1/models``: the base names first, then the adapters (which have no ``max_model_len``)."""
        created = int(time.time())
        cards = [
            _card(name, created, root=self.root, parent=None, max_model_len=self.max_model_len)
            for name in self.names
        ]
        cards += [
            _card(name, created, root=path, parent=self.primary, max_model_len=None)
            for name, path in self.adapters.items()
        ]
        return {"object": "list", "data": cards}


def _card(
    name: str, created: int, *, root: str, parent: str | None, max_model_len: int | None
) -> dict[str, Any]:
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
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
