"""The event loop's lag (`loop_lag.py`) on a real asyncio loop: a hold of the loop is seen."""

from __future__ import annotations

import asyncio
import contextlib
import time

from clearml_umem.loop_lag import watch_loop_lag


def test_a_blocking_call_on_the_loop_is_seen_as_that_much_lag() -> None:
    """The watcher's timer was due at most one tick after the hold began, so it saw at least the
    hold less one tick; on a quiet loop its ticks were on time within the hold's length."""
    seen: list[float] = []

    async def main() -> None:
        watcher = asyncio.create_task(watch_loop_lag(seen.append, tick_s=0.01))
        await asyncio.sleep(0.1)
        quiet = len(seen)
        time.sleep(0.3)  # what a parse on the loop does to every client
        await asyncio.sleep(0.05)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        assert quiet >= 2 and all(lag < 0.29 for lag in seen[:quiet]), seen[:quiet]

    asyncio.run(main())
    assert max(seen) >= 0.29, seen
    assert all(lag >= 0 for lag in seen)
