"""One engine start at a time per device, as an object engines are handed.

A starting vLLM checks the free device memory against what it was asked for and profiles
its own use; a second engine allocating beside it at the same time makes both wrong (an
engine refused for memory that is only briefly taken, or a KV cache sized on a half-loaded
neighbour). On a CPU, two starts sharing the cores would each take twice as long, so the
first model to be asked for is served sooner this way too.

Every engine on one device gets the same `StartGate` from `StartGates.for_device`, so who
waits for whom is visible where the engine is built instead of hidden in a module lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator


class StartGate:
    """Lets one start through at a time on one device.

    An `asyncio.Lock` belongs to the event loop that first waits on it, and the same engines
    can be driven from more than one loop in a process (each `asyncio.run` of a test or a
    tool is a new one), so the gate keeps one lock per loop, weakly: a finished loop's lock
    goes with it. Starts in different loops do not exclude each other, as before the gate
    was an object; the router runs them all in one loop.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary())

    @property
    def busy(self) -> bool:
        """Whether a start holds the gate in the running event loop (a caller would wait)."""
        return self._lock().locked()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for the gate, hold it for the body (a launch and its wait for health)."""
        async with self._lock():
            yield

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock


class StartGates:
    """Hands out the gate of each device, the same one to every engine that names that device."""

    def __init__(self) -> None:
        self._gates: dict[str, StartGate] = {}

    def for_device(self, device: str) -> StartGate:
        gate = self._gates.get(device)
        if gate is None:
            gate = self._gates.setdefault(device, StartGate(device))
        return gate


START_GATES = StartGates()
"""The gates of this interpreter: engines share a device whichever runtime created them."""
