"""One request's hold on a model: the lease, the engine's token stream, and the request's events.

A streaming answer is produced by the response after the handler has returned, so the
lease outlives the `async with` a handler could write: it sits in an exit stack that
`close()` unwinds, whichever task gets there (the handler on an error, the response when
the stream ends or the client leaves). `close()` is shielded from cancellation, because
skipping it would leave the model leased forever and never evictable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, Protocol

import anyio

from clearml_umem.engines.base import Delta, GenerationRequest
from clearml_umem.engines.prompt_check import PromptBound
from clearml_umem.errors import ServingError
from clearml_umem.events import EventBus, FirstToken, RequestFinished
from clearml_umem.router.errors import api_error
from clearml_umem.runtime import Lease
from clearml_umem.spec import ModelSpec
from clearml_umem.tiers import Tier

log = logging.getLogger(__name__)



class ServingRuntime(Protocol):
    """What the router needs from `clearml_umem.runtime.Runtime`; tests pass a fake with the same shape."""

    bus: EventBus

    def has_model(self, name: str) -> bool: ...

    def spec(self, name: str) -> ModelSpec: ...

    def model_names(self) -> list[str]: ...

    def prompt_bounds(self) -> Mapping[str, PromptBound]: ...

    async def check_request(self, model: str, request: GenerationRequest, small: bool = False) -> None: ...

    def lease(self, model: str, request_id: str,
              keep_alive: float | None = None) -> AbstractAsyncContextManager[Lease]: ...

    async def place(self, model: str, tier: Tier) -> Any: ...

    def admin_view(self) -> list[dict[str, Any]]: ...

    def memory(self) -> Mapping[str, int]: ...


def resolve_model(runtime: ServingRuntime, name: object) -> str | None:
    """The served model a request's `model` names: itself, or the model it is an alias of; None if neither."""
    if not isinstance(name, str):
        return None
    if runtime.has_model(name):
        return name
    return next((m for m in runtime.model_names() if name in runtime.spec(m).aliases), None)


def with_model_defaults(data: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """The request body with the model's `defaults` filled in where the client left a setting unset
    (absent or null); what the client sent wins. `max_tokens` counts as set when the client sent
    `max_completion_tokens`, its newer name."""
    filled = dict(data)
    for key, value in spec.defaults.items():
        if filled.get(key) is not None:
            continue
        if key == "max_tokens" and filled.get("max_completion_tokens") is not None:
            continue
        filled[key] = value
    return filled


class Generation:
    def __init__(self, runtime: ServingRuntime, model: str, request: GenerationRequest, request_id: str,
                 arrived: float, keep_alive: float | None = None, small: bool = False) -> None:
        self.runtime = runtime
        self.small = small
        """The request's body was small enough to parse on the event loop (router/app.py): so is its check."""
        self.model = model
        self.request = request
        self.request_id = request_id
        self.arrived = arrived
        self.keep_alive = keep_alive
        self.served_from: Tier | None = None
        self.ttft_s: float | None = None
        self.finish_reason: str | None = None
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self._pieces = 0
        self._stack = AsyncExitStack()
        self._stream: AsyncIterator[Delta] | None = None
        self._pending: Delta | None = None
        self._exhausted = False
        self._first_token_sent = False
        self._closed = False

    async def open(self) -> None:
        """Wait for the model, start generating and pull the first delta.

        Pulling it before any byte is sent lets an engine's refusal (prompt too long for the
        context...) still be a proper HTTP error instead of an error in the middle of a stream.
        """
        try:
            await self.runtime.check_request(self.model, self.request, small=self.small)
            lease = await self._stack.enter_async_context(
                self.runtime.lease(self.model, self.request_id, keep_alive=self.keep_alive))
        except ServingError as exc:
            raise api_error(exc) from None
        self.served_from = lease.served_from
        try:
            self._stream = lease.engine.generate(self.request)
            self._pending = await self._pull()
        except BaseException:
            await self.close(ok=False)
            raise

    async def _pull(self) -> Delta | None:
        assert self._stream is not None
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            self._exhausted = True
            return None
        except ServingError as exc:
            raise api_error(exc) from exc

    async def next_delta(self) -> Delta | None:
        """The next piece of the answer, None at its end; raises APIError when the engine fails."""
        if self._pending is not None:
            delta, self._pending = self._pending, None
        elif self._exhausted or self._stream is None:
            return None
        else:
            delta = await self._pull()
            if delta is None:
                return None
        if delta.prompt_tokens is not None:
            self._prompt_tokens = delta.prompt_tokens
        if delta.completion_tokens is not None:
            self._completion_tokens = delta.completion_tokens
        if delta.text:
            self._pieces += 1
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        return delta

    async def collect(self) -> str:
        """The whole answer, for a reply sent in one piece: opens, reads every delta (TTFT counted at
        the first, as for a stream) and closes, whatever the outcome."""
        await self.open()
        ok = False
        pieces: list[str] = []
        try:
            while (delta := await self.next_delta()) is not None:
                self.first_token()
                pieces.append(delta.text)
            ok = True
        finally:
            await self.close(ok)
        return "".join(pieces)

    def usage(self) -> dict[str, int]:
        """Token counts from the engine; without them, one token per streamed piece is the best guess."""
        prompt = self._prompt_tokens or 0
        completion = self._completion_tokens if self._completion_tokens is not None else self._pieces
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def first_token(self) -> None:
        """Records TTFT once, at the moment the first token leaves for the client."""
        if self._first_token_sent or self.served_from is None:
            return
        self._first_token_sent = True
        now = time.monotonic()
        self.ttft_s = now - self.arrived
        self.runtime.bus.emit(FirstToken(model=self.model, t=now, request_id=self.request_id,
                                         served_from=self.served_from, ttft_s=self.ttft_s))

    async def close(self, ok: bool) -> None:
        """Stop generation, give the lease back, report the request; idempotent and cancellation-proof."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            stream, self._stream = self._stream, None
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001 - the lease must still be released
                    log.exception("request %s: closing the engine stream failed", self.request_id)
            try:
                await self._stack.aclose()
            except Exception:  # noqa: BLE001 - a runtime bug must not turn a served answer into an error
                log.exception("request %s: releasing the lease on %s failed", self.request_id, self.model)
        if self.served_from is not None:
            now = time.monotonic()
            self.runtime.bus.emit(RequestFinished(model=self.model, t=now, request_id=self.request_id,
                                                  served_from=self.served_from, ok=ok,
                                                  completion_tokens=self.usage()["completion_tokens"],
                                                  duration_s=now - self.arrived))
