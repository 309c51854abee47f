"""`router/disconnect.until_disconnect`, driven by a fake ASGI `receive` that the test gates: the
work is cancelled when the client leaves, nothing else is, and the task is left as it was found."""

from __future__ import annotations

import asyncio
import sys

import pytest

from clearml_umem.router.disconnect import ClientGone, until_disconnect


class Client:
    """An ASGI receive channel: `leave()` makes it answer http.disconnect."""

    def __init__(self) -> None:
        self.left = asyncio.Event()
        self.reads = 0

    async def receive(self) -> dict[str, object]:
        self.reads += 1
        await self.left.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.left.set()


def _cancelling(task: asyncio.Task[object] | None) -> int:
    assert task is not None
    return task.cancelling() if sys.version_info >= (3, 11) else 0


def test_work_that_finishes_returns_its_result_and_stops_the_watcher() -> None:
    async def run() -> tuple[int, int, int]:
        client = Client()
        before = len(asyncio.all_tasks())

        async def work() -> int:
            await asyncio.sleep(0)
            return 7

        result = await until_disconnect(client.receive, work)
        await asyncio.sleep(0)  # the watcher's cancellation runs
        return result, len(asyncio.all_tasks()) - before, client.reads

    result, extra_tasks, reads = asyncio.run(run())
    assert (result, extra_tasks, reads) == (7, 0, 1)


def test_a_client_that_leaves_cancels_the_work_and_the_task_goes_on() -> None:
    async def run() -> tuple[list[str], int]:
        client = Client()
        steps: list[str] = []

        async def work() -> None:
            try:
                steps.append("waiting")
                await asyncio.sleep(3600)
            finally:
                steps.append("cleaned up")

        asyncio.get_running_loop().call_later(0.05, client.leave)
        with pytest.raises(ClientGone):
            await until_disconnect(client.receive, work)
        await asyncio.sleep(0)  # no cancellation is left over for the caller's next await
        steps.append("went on")
        return steps, _cancelling(asyncio.current_task())

    steps, cancelling = asyncio.run(run())
    assert steps == ["waiting", "cleaned up", "went on"]
    assert cancelling == 0


def test_work_that_swallows_the_cancellation_keeps_its_result() -> None:
    async def run() -> tuple[str, int]:
        client = Client()

        async def work() -> str:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return "opened"  # holds something the caller must release
            return "not reached"

        asyncio.get_running_loop().call_later(0.05, client.leave)
        result = await until_disconnect(client.receive, work)
        await asyncio.sleep(0)
        return result, _cancelling(asyncio.current_task())

    assert asyncio.run(run()) == ("opened", 0)


def test_a_cancellation_from_elsewhere_is_not_taken_for_the_client_leaving() -> None:
    async def run() -> list[str]:
        outcomes: list[str] = []
        for client_leaves_too in (False, True):
            client = Client()
            started = asyncio.Event()

            async def work(started: asyncio.Event = started) -> None:
                started.set()
                await asyncio.sleep(3600)

            async def request(client: Client = client, work=work) -> None:  # type: ignore[no-untyped-def]
                await until_disconnect(client.receive, work)

            task = asyncio.create_task(request())
            await started.wait()
            if client_leaves_too and sys.version_info >= (3, 11):
                client.leave()
            task.cancel()  # the server stops
            try:
                await task
            except asyncio.CancelledError:
                outcomes.append("cancelled")
            except ClientGone:
                outcomes.append("client gone")
        return outcomes

    assert asyncio.run(run()) == ["cancelled", "cancelled"]
