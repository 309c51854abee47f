"""The parser processes that check big bodies for the router (`router/parser_pool.py`), real ones:
verdicts come from another process, the queue is bounded, a client that left costs no parse, and
no parser process outlives the process that started it, even one killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from clearml_umem.router.errors import APIError
from clearml_umem.router.parser_pool import ParserPool
from tests.routerproc import wait_gone

BIG = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}] * 200_000}).encode()
FINE = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 500}] * 200}).encode()


def test_verdicts_come_from_a_parser_process() -> None:
    async def run() -> tuple[APIError, list[int], int, str]:
        pool = ParserPool(processes=1)
        try:
            await pool.check(FINE, chat=True, max_messages=10000)
            with pytest.raises(APIError) as caught:
                await pool.check(BIG, chat=True, max_messages=10000)
            return caught.value, pool.pids, pool.checked, " ".join(psutil.Process(pool.pids[0]).cmdline())
        finally:
            await pool.close()

    error, pids, checked, cmdline = asyncio.run(run())
    assert error.status == 400 and error.param == "messages" and error.code == "too_many_messages"
    assert checked == 2 and len(pids) == 1 and pids[0] != os.getpid()
    assert "clearml_umem.parser_child" in cmdline
    assert wait_gone(pids, timeout=10) == []  # close() ended it


def test_a_full_queue_is_a_503_with_retry_after_and_a_client_that_left_costs_no_parse() -> None:
    async def run() -> tuple[list[object], int, int]:
        pool = ParserPool(processes=1, queue=2)
        try:
            first = asyncio.create_task(pool.check(BIG, True, 10000))  # in the parser process
            await asyncio.sleep(0)
            gone = asyncio.create_task(pool.check(BIG, True, 10000))  # waits, then its client leaves
            waiting = asyncio.create_task(pool.check(FINE, True, 10000))
            await asyncio.sleep(0)
            with pytest.raises(APIError) as full:
                await pool.check(FINE, True, 10000)
            gone.cancel()
            outcomes = await asyncio.gather(first, gone, waiting, return_exceptions=True)
            assert full.value.status == 503 and full.value.headers == {"Retry-After": "1"}
            return outcomes, pool.checked, pool.skipped
        finally:
            await pool.close()

    (first, gone, waiting), checked, skipped = asyncio.run(run())
    assert isinstance(first, APIError) and first.status == 400
    assert isinstance(gone, asyncio.CancelledError)
    assert waiting is None
    assert (checked, skipped) == (2, 1)  # the body whose client left never reached the parser process


HOLDER = textwrap.dedent("""
    import asyncio, json, sys
    from clearml_umem.router.parser_pool import ParserPool

    async def main():
        pool = ParserPool(processes=2)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}] * 20000}).encode()
        await asyncio.gather(pool.check(body, True, 100000), pool.check(body, True, 100000))
        print(" ".join(map(str, pool.pids)), flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_parser_processes_end_with_their_parent(sig: signal.Signals) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        pids = [int(p) for p in holder.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.Process(p).ppid() == holder.pid for p in pids)
        holder.send_signal(sig)
        holder.wait(30)
        assert wait_gone(pids, timeout=20) == []
    finally:
        holder.kill()
        holder.wait(30)
