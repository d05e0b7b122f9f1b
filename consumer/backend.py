"""The consumer's view of its vLLM server, through one pooled httpx client."""

from __future__ import annotations

from typing import Any

import httpx

from consumer.flow import BackendLoad, parse_vllm_metrics


class Backend:
    def __init__(self, base_url: str, *, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            # Reads wait as long as generation takes: each request is bounded by its own deadline.
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def healthy(self) -> bool:
        try:
            response = await self.client.get("/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def model_card(self, model: str) -> dict[str, Any]:
        """The backend's ``/v1/models`` entry for ``model`` (or its only entry), renamed to ``model``."""
        response = await self.client.get("/v1/models", timeout=5.0)
        response.raise_for_status()
        entries = response.json().get("data") or []
        card = next((e for e in entries if e.get("id") == model), entries[0] if entries else {})
        card = {key: value for key, value in card.items() if key in _CARD_FIELDS}
        card["id"] = model
        return card

    async def load(self) -> BackendLoad | None:
        try:
            response = await self.client.get("/metrics", timeout=1.0)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return parse_vllm_metrics(response.text)


_CARD_FIELDS = {"id", "object", "created", "owned_by", "root", "parent", "max_model_len"}
