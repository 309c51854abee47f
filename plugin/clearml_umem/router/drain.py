"""The router's stop (SIGTERM): running requests get a grace period, then an error they can read.

Kubernetes sends SIGTERM and kills the pod `terminationGracePeriodSeconds` later (systemd: its
stop timeout). Between the two, the server stops accepting, answers every queued request at once
with a 503 and Retry-After (the runtime's part), and lets running requests finish for `grace_s`.
What still runs then is ended the way a client can tell from a finished answer: a stream gets an
error event and `[DONE]`, a non-streamed request a 503 in OpenAI's shape.

Until the stop begins, `within_grace` is a plain await: no task per token on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from clearml_umem.router.errors import UNAVAILABLE, APIError

T = TypeVar("T")

RETRY_AFTER_S = 2
"""What a client refused during a stop is told to wait: another replica, or this one restarted."""


class GraceOver(Exception):
    """The stop's grace period ended while this request was still running."""

    def __init__(self, grace_s: float) -> None:
        super().__init__("grace over")
        self.error = APIError(503, f"The server is shutting down and the {grace_s:g} s it gives running requests "
                              "ended before this one did; retry it", UNAVAILABLE, code="server_shutting_down",
                              headers={"Retry-After": str(RETRY_AFTER_S)})


class Drain:
    def __init__(self) -> None:
        self.grace_s: float | None = None
        self._over: asyncio.Event | None = None

    @property
    def stopping(self) -> bool:
        return self.grace_s is not None

    def begin(self, grace_s: float) -> None:
        """Start the grace period (on the event loop); requests still running at its end are ended."""
        if self.grace_s is not None:
            return
        self.grace_s = grace_s
        self._over = asyncio.Event()
        asyncio.get_running_loop().call_later(grace_s, self._over.set)

    async def within_grace(self, step: Callable[[], Awaitable[T]]) -> T:
        """`await step()`, or GraceOver when the grace period ends first."""
        over = self._over
        if over is None:
            return await step()
        if over.is_set():
            raise GraceOver(self.grace_s or 0.0)
        work = asyncio.ensure_future(step())
        waiter = asyncio.ensure_future(over.wait())
        try:
            await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise GraceOver(self.grace_s or 0.0)
