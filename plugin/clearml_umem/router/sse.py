"""Server-sent events in OpenAI's exact streaming shapes, and a response that never leaks a stream.

Starlette's StreamingResponse leaves an abandoned body generator to the garbage collector
on some paths (a send that fails after the client left). Here the generator is always
closed, at once and shielded from cancellation, because closing it is what cancels the
engine's generation and gives the model's lease back to the scheduler.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anyio
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from clearml_umem.router.disconnect import ClientGone, until_disconnect

DONE = b"data: [DONE]\n\n"


def event(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_chunk(request_id: str, created: int, model: str, delta: Mapping[str, Any] | None,
               finish_reason: str | None = None, *, include_usage: bool = False,
               usage_value: Mapping[str, int] | None = None,
               logprobs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk (empty choices)."""
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                             "model": model, "system_fingerprint": None}
    chunk["choices"] = [] if delta is None else [
        {"index": 0, "delta": dict(delta), "logprobs": logprobs, "finish_reason": finish_reason}]
    if include_usage:
        chunk["usage"] = dict(usage_value) if usage_value is not None else None
    return chunk


def completion_chunk(request_id: str, created: int, model: str, text: str | None,
                     finish_reason: str | None = None, *, include_usage: bool = False,
                     usage_value: Mapping[str, int] | None = None,
                     logprobs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One streamed `text_completion`; `text=None` makes the usage-only chunk (empty choices)."""
    chunk: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                             "system_fingerprint": None}
    chunk["choices"] = [] if text is None else [
        {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
    if include_usage:
        chunk["usage"] = dict(usage_value) if usage_value is not None else None
    return chunk


class EventStreamResponse(Response):
    """Sends `events` as text/event-stream; stops at a client disconnect and always closes `events`."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], headers: Mapping[str, str] | None = None,
                 background: BackgroundTask | None = None) -> None:
        self.events = events
        self.status_code = 200
        self.background = background
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, lambda: self._pump(send))
        except ClientGone:
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
        if self.background is not None:
            await self.background()

    async def _pump(self, send: Send) -> None:
        """The events as they come; the one that ends with [DONE] ends the response too, before the
        generator's cleanup (the lease, the access log) runs: the client has its whole answer first."""
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.events:
                last = chunk.endswith(DONE)
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            return  # ASGI 2.4 servers report a client that left as a failed send
