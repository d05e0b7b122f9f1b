"""What tests need to talk to a sender: the token header, and waiting until it lists a model."""

from __future__ import annotations

import asyncio

import httpx

from harness.stack import Service


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def wait_listed(
    sender: Service, token: str, model: str, listed: bool = True, timeout: float = 20
) -> None:
    """Wait until the sender's ``/v1/models`` lists ``model`` (or, ``listed=False``, no longer does)."""
    async with httpx.AsyncClient(base_url=sender.url, headers=auth(token)) as client:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            response = await client.get("/v1/models")
            ids = [entry["id"] for entry in response.json().get("data", [])]
            if (model in ids) == listed:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"model {model} {'never' if listed else 'still'} listed after {timeout} s")
