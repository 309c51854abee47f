"""Send one request to the best router for its model, and hand back the router's answer unread.

Used by the standalone front and by clearml-serving's forwarder (serving/preprocess.py), so both
route alike. A router that cannot be reached (the connection is refused or times out: it never got
the request) is marked gone and the next one is tried; once a router has the request, a failure
is the caller's clean error, never a second generation elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from clearml_umem.fleet.choose import RouterView, rank
from clearml_umem.fleet.probe import Fleet

Chooser = Callable[[list[RouterView], str], list[RouterView]]

UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)
"""Failures that prove the router never got the request: another router may take it."""


class NoRouter(Exception):
    """No running router serves the model (a 503 naming it). `down`: the routers known and not
    answering, with why; `none_up` when that is every router known."""

    status = 503

    def __init__(self, model: str, down: dict[str, str], none_up: bool) -> None:
        self.model = model
        self.down = down
        self.none_up = none_up
        gone = "; ".join(f"{url} did not answer ({why})" for url, why in down.items())
        super().__init__(f"model {model!r} is not served by any running router" + (f": {gone}" if gone else ""))


class RouterGone(Exception):
    """The router had the request and went away before answering (a 502)."""

    status = 502

    def __init__(self, url: str, exc: BaseException) -> None:
        self.url = url
        super().__init__(f"the router at {url} went away while serving the request: {type(exc).__name__}")


@dataclass
class Sent:
    """A router's answer, headers read, body not yet: `close` it (or read it to the end)."""

    url: str
    response: httpx.Response
    fleet: Fleet
    closed: bool = field(default=False)

    async def body(self) -> bytes:
        try:
            return await self.response.aread()
        except httpx.HTTPError as exc:
            self.fleet.mark_down(self.url, f"{type(exc).__name__} mid-answer")
            raise RouterGone(self.url, exc) from exc
        finally:
            await self.close()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; RouterGone when the router dies part-way (the caller tells its client)."""
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            self.fleet.mark_down(self.url, f"{type(exc).__name__} mid-answer")
            raise RouterGone(self.url, exc) from exc
        finally:
            await self.close()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.fleet.finished(self.url)
            await self.response.aclose()
            self.fleet.kick(self.url)


async def send(fleet: Fleet, client: httpx.AsyncClient, method: str, path: str, model: str,
               body: dict[str, Any] | None, headers: dict[str, str], chooser: Chooser = rank,
               timeout_s: float | None = None) -> Sent:
    """The answer of the best router for `model` that can be reached; NoRouter when none serves it."""
    await fleet.ready()
    candidates = chooser(fleet.views(), model)
    if not candidates:
        await fleet.refresh()  # a router may have just come up
        candidates = chooser(fleet.views(), model)
    for view in candidates:
        fleet.sent(view.url, model)
        request = client.build_request(method, view.url + path, json=body, headers=headers,
                                       timeout=timeout_s if timeout_s is not None else client.timeout)
        try:
            response = await client.send(request, stream=True)
        except UNREACHABLE as exc:
            fleet.finished(view.url)
            fleet.mark_down(view.url, f"{type(exc).__name__}: {exc}")
            continue
        except httpx.HTTPError as exc:
            fleet.finished(view.url)
            fleet.mark_down(view.url, f"{type(exc).__name__} before answering")
            raise RouterGone(view.url, exc) from exc
        except BaseException:
            fleet.finished(view.url)
            raise
        return Sent(view.url, response, fleet)
    views = fleet.views()
    down = {v.url: v.error or "gone" for v in views if not v.alive}
    raise NoRouter(model, down, none_up=not any(v.alive for v in views))


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
