"""Talking to an engine server that speaks OpenAI's API (vLLM, llama-server): the request body,
the streamed answer, and the one retry after the server died.

Both process engines generate the same way, so it lives once here: a difference between
them is a parameter (the server's name in messages, how it refuses a request, how a restart
is done), not a copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from clearml_umem.engines.base import Delta, EngineError, GenerationRequest
from clearml_umem.engines.engine_http import post_stream
from clearml_umem.engines.vllm_process import VLLMProcess, error_message

log = logging.getLogger(__name__)

Refusal = Callable[[int, str], Exception]
"""How a server's non-200 answer becomes an error: (status, message) -> the exception to raise."""


def openai_body(model: str, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
    """The path and streaming OpenAI body for one request; greedy (temperature 0) stays greedy."""
    body: dict[str, Any] = {
        "model": model, "max_tokens": request.max_tokens, "temperature": request.temperature,
        "top_p": request.top_p, "stream": True, "stream_options": {"include_usage": True},
    }
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    body.update(request.options)
    if request.is_chat:
        body["messages"] = request.messages
        return "/v1/chat/completions", body
    body["prompt"] = request.prompt or ""
    return "/v1/completions", body


class SSEDecoder:
    """Turns the lines of an OpenAI streaming response into Deltas.

    Text arrives in chunks with `finish_reason: null`; the finish reason comes in the last
    choice chunk and the token counts in a chunk with no choices (`include_usage`), so the
    finish Delta is only built once the stream says `[DONE]`.
    """

    def __init__(self, chat: bool, label: str = "vLLM", top_logprobs: int | None = None) -> None:
        self.chat = chat
        self.top_logprobs = top_logprobs
        """Alternatives per token to keep (a server may send more than the client asked for)."""
        self.label = label
        self.done = False
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, line: str) -> list[Delta]:
        line = line.strip()
        if not line.startswith("data:"):
            return []
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            self.done = True
            return []
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise EngineError(f"{self.label} sent an unreadable stream chunk: {payload[:200]!r}") from exc
        if not isinstance(chunk, dict):
            return []
        if chunk.get("error"):
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise EngineError(f"{self.label} failed mid-stream: {message}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
        out: list[Delta] = []
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            source = (choice.get("delta") or {}) if self.chat else choice
            text = source.get("content" if self.chat else "text") or ""
            calls = source.get("tool_calls") if self.chat else None
            entries = _logprob_entries(choice.get("logprobs"), self.chat, self.top_logprobs)
            if text or calls or entries:
                out.append(Delta(text=text, tool_calls=calls or None, logprobs=entries))
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return out

    def finish(self) -> Delta:
        if self.finish_reason is None:
            raise EngineError(f"{self.label} ended the stream without a finish reason")
        return Delta(text="", finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
                     completion_tokens=self.completion_tokens)


def _logprob_entries(logprobs: Any, chat: bool, top: int | None = None) -> list[dict[str, Any]] | None:
    """A chunk's logprobs as OpenAI's chat entries, whichever shape the server sent: chat's
    `content` list (llama-server sends it for completions too) or completions' parallel lists."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        return [_entry(e, top) for e in logprobs["content"] if isinstance(e, dict)] or None
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    entries = []
    for i, token in enumerate(tokens):
        alternatives = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        entries.append({"token": token, "logprob": values[i] if i < len(values) else None,
                        "bytes": list(str(token).encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(str(t).encode())}
                                         for t, v in alternatives.items()]})
    return entries or None


def _entry(raw: dict[str, Any], top: int | None) -> dict[str, Any]:
    """OpenAI's four keys (llama-server adds the token id), the alternatives cut to `top`."""
    alternatives = [{"token": a.get("token"), "logprob": a.get("logprob"), "bytes": a.get("bytes")}
                    for a in raw.get("top_logprobs") or () if isinstance(a, dict)]
    return {"token": raw.get("token"), "logprob": raw.get("logprob"), "bytes": raw.get("bytes"),
            "top_logprobs": alternatives if top is None else alternatives[:top]}


async def stream_answer(process: VLLMProcess, path: str, body: dict[str, Any], chat: bool, label: str,
                        refuse: Refusal, top_logprobs: int | None = None) -> AsyncIterator[Delta]:
    """One streamed answer from the server; closing the iterator closes the HTTP stream, which
    makes the server stop generating. Every line received counts as progress (`VLLMProcess.hung`)."""
    decoder = SSEDecoder(chat=chat, label=label, top_logprobs=top_logprobs)
    endpoint = process.endpoint
    socket = str(endpoint.socket) if endpoint.socket is not None else None
    with process.streaming() as progressed:
        async with post_stream(socket, endpoint.port, path, body, api_key=endpoint.api_key,
                               read_timeout_s=process.config.timeouts.request_s) as resp:
            if resp.status_code != 200:
                raise refuse(resp.status_code, error_message(await resp.aread()))
            async with contextlib.aclosing(resp.aiter_lines()) as lines:  # closed here, not by the loop's finalizer
                async for line in lines:
                    progressed()
                    for delta in decoder.feed(line):
                        yield delta
                    if decoder.done:
                        break
    yield decoder.finish()


async def generate_restarting_once(name: str, label: str, process: VLLMProcess,
                                   stream: Callable[[], AsyncIterator[Delta]],
                                   restart_if_dead: Callable[[int], Awaitable[None]]) -> AsyncIterator[Delta]:
    """Stream an answer; a server found dead before any text was sent is restarted and the
    request tried once more (a client should not see the crash of a server it never reached)."""
    for attempt in range(2):
        incarnation = process.incarnation
        if not process.running:
            await restart_if_dead(incarnation)
            incarnation = process.incarnation
        sent = False
        try:
            async with contextlib.aclosing(stream()) as deltas:
                async for delta in deltas:
                    sent = True
                    yield delta
            return
        except httpx.TransportError as exc:
            dead = await process.exits_within(2.0)
            if sent or attempt == 1 or not dead:
                raise EngineError(f"model {name!r}: stream from {label} failed: {type(exc).__name__}: {exc}") from exc
            await restart_if_dead(incarnation)  # raises where the router stopped it (found hung, closed)
            log.warning("model %s: %s died under a request; started again, the request is tried once more",
                        name, label)
