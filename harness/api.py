"""What tests need to talk to a sender: the token header, waiting for a model to be listed, a status."""

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


async def status_of(front: Service, secret: str, model: str) -> int:
    async with httpx.AsyncClient(base_url=front.url, headers=auth(secret)) as http:
        response = await http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
    return response.status_code


async def until_status(front: Service, secret: str, model: str, expected: int, timeout: float = 10) -> None:
    """Poll until a request answers ``expected`` (changes take effect within the cache TTL)."""
    deadline = asyncio.get_running_loop().time() + timeout
    status = None
    while asyncio.get_running_loop().time() < deadline:
        status = await status_of(front, secret, model)
        if status == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still {status} instead of {expected} after {timeout} s")
