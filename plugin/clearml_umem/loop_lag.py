"""How late the router's event loop runs what is due: one number for everything that holds it.

Every client of a router waits on one event loop: a parse, a full garbage collection, a blocking
call or a thread that keeps the GIL delays all of them alike, and from the outside it only shows
as a slower first token that could have any cause. A timer due every `TICK_S` and the time it
actually ran say how long the loop was held, whatever held it (as Node's `monitorEventLoopDelay`
and the event-loop-lag metrics built on it do). `umem_event_loop_lag_seconds` on `/metrics`
counts them; `benchmarks/big_bodies.py` compares them while big bodies arrive and while the same
work runs outside the router.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

TICK_S = 0.01
"""A hold of the loop shorter than this may fall between two ticks and go unseen; one longer is
always seen, less at most one tick. 100 wake-ups a second cost an idle router about 1.4% of a
core on a 2-core VM (14 ms of CPU a second, measured with the tick and with none): most of its
idle CPU, and nothing next to a model's."""


async def watch_loop_lag(observe: Callable[[float], None], tick_s: float = TICK_S) -> None:
    """Observes, every `tick_s`, how long after it was due the loop woke this coroutine (seconds).
    Runs until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick_s
        await asyncio.sleep(tick_s)
        observe(max(0.0, loop.time() - due))
