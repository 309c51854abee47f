"""A small HTTP client for the router, shared by the demo and the benchmark.

It turns off Nagle's algorithm: httpx writes a request's headers and body separately,
and with Nagle on, the body can wait for a delayed ACK (about 40 ms on Linux), which
would swamp the time to first token it is there to measure.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import httpx

from clearml_umem.tiers import Tier

DEFAULT_PROMPT: list[dict[str, Any]] = [{"role": "user", "content": "Say something about unified memory."}]


def open_client(base_url: str, api_key: str | None = None, timeout: float = 600.0) -> httpx.Client:
    """`api_key` defaults to UMEM_API_KEY, so a protected router works without extra flags."""
    key = api_key if api_key is not None else os.environ.get("UMEM_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)


def stream_ttft(client: httpx.Client, model: str, max_tokens: int = 8,
                messages: list[dict[str, Any]] | None = None) -> tuple[float, str]:
    """Seconds from sending a greedy streaming chat request to its first content, and the whole text."""
    body = {"model": model, "messages": messages or DEFAULT_PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    start = time.perf_counter()
    ttft: float | None = None
    text: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {resp.status_code}: {resp.read().decode(errors='replace')}")
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    text.append(piece)
    if ttft is None:
        raise RuntimeError(f"{model}: the stream ended without content")
    return ttft, "".join(text)


def place(client: httpx.Client, model: str, tier: Tier) -> str | None:
    """Put `model` in `tier` and wait; the reason when it cannot be (an engine without that tier)."""
    resp = client.post(f"/admin/models/{model}/place", json={"tier": tier.value})
    if resp.status_code >= 400:
        return f"place {tier.value}: HTTP {resp.status_code} {resp.text[:200]}"
    return None


def tier_of(client: httpx.Client, model: str) -> Tier:
    rows = client.get("/admin/models").raise_for_status().json()["data"]
    return Tier(next(r["tier"] for r in rows if r["name"] == model))
