"""router/connections.CoalescedWrites: what a handler writes without waiting leaves in one send."""

from __future__ import annotations

import asyncio
from typing import Any

from clearml_umem.router.connections import COALESCE_BYTES, CoalescedWrites


class Recorder:
    """The real transport's side: every write it is given, and whether it was closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def run(scenario: Any) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_writes_of_one_pass_leave_together_and_after_an_await_separately() -> None:
    async def scenario() -> None:
        real = Recorder()
        writes = CoalescedWrites(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        writes.write(b"HTTP/1.1 200 OK\r\n\r\n")
        writes.write(b"")
        writes.write(b"data: a\n\n")
        assert real.writes == [] and writes.get_write_buffer_size() == 28
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\ndata: a\n\n"]
        writes.write(b"data: b\n\n")
        await asyncio.sleep(0)
        writes.writelines([b"0\r\n", b"\r\n"])
        await asyncio.sleep(0)
        assert real.writes[1:] == [b"data: b\n\n", b"0\r\n\r\n"]
        assert writes.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the real transport's

    run(scenario)


def test_close_sends_what_waits_first_abort_drops_it_and_big_writes_leave_at_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        real = Recorder()
        writes = CoalescedWrites(real, loop)  # type: ignore[arg-type]
        writes.write(b"last words")
        writes.close()
        assert real.writes == [b"last words"] and real.closed
        await asyncio.sleep(0)
        assert real.writes == [b"last words"], "nothing is sent twice"

        real = Recorder()
        writes = CoalescedWrites(real, loop)  # type: ignore[arg-type]
        writes.write(b"never sent")
        writes.abort()
        await asyncio.sleep(0)
        assert real.writes == [] and real.aborted

        real = Recorder()
        writes = CoalescedWrites(real, loop)  # type: ignore[arg-type]
        writes.write(b"h")
        writes.write(b"x" * COALESCE_BYTES)
        assert real.writes == [b"h" + b"x" * COALESCE_BYTES], "past the size a write does not wait for the loop"

    run(scenario)
