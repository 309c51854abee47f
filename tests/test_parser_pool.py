"""The parser processes that prepare big bodies for the router (`router/parser_pool.py`), real ones:
bodies are parsed and validated in another process, the queue is bounded, a client that left costs
no parse, and no parser process outlives the process that started it, even one killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from clearml_umem.engines.prompt_check import PromptBound
from clearml_umem.router.body_handoff import SharedBody
from clearml_umem.router.errors import APIError
from clearml_umem.router.parser_pool import ParserPool
from clearml_umem.router.parser_wire import encode_bounds
from clearml_umem.router.schemas import PreparedBody, refuse_triton_prompt
from tests.routerproc import wait_gone
from tests.waiting import wait_until

BIG = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}] * 200_000}).encode()
FINE = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 500}] * 200}).encode()


def test_bodies_are_prepared_in_a_parser_process() -> None:
    async def run() -> tuple[bytes, APIError, list[int], int, str]:
        pool = ParserPool(processes=1)
        try:
            prepared = await pool.prepare(FINE, "chat", max_messages=10000)
            with pytest.raises(APIError) as caught:
                await pool.prepare(BIG, "chat", max_messages=10000)
            return prepared, caught.value, pool.pids, pool.checked, " ".join(psutil.Process(pool.pids[0]).cmdline())
        finally:
            await pool.close()

    payload, error, pids, checked, cmdline = asyncio.run(run())
    prepared = pickle.loads(payload)
    assert isinstance(prepared, PreparedBody)
    # the conversation comes apart from the settings, as the engine takes it
    assert prepared.data == {"model": "m"}
    assert prepared.messages == [{"role": "user", "content": "x" * 500}] * 200
    assert error.status == 400 and error.param == "messages" and error.code == "too_many_messages"
    assert checked == 2 and len(pids) == 1 and pids[0] != os.getpid()
    assert "clearml_umem.parser_child" in cmdline
    assert wait_gone(pids, timeout=10) == []  # close() ended it


def batch_and_niced(pid: int) -> bool:
    """Every thread of `pid` niced by `NICENESS` or more and a batch task: a body handed to it never
    preempts the event loop that woke it (`child_process.yield_cores`)."""
    from clearml_umem.child_process import NICENESS

    tids = [t.id for t in psutil.Process(pid).threads()]
    return bool(tids) and all(os.sched_getscheduler(tid) == os.SCHED_BATCH
                              and os.getpriority(os.PRIO_PROCESS, tid) >= NICENESS for tid in tids)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux's scheduling policies")
def test_a_parser_process_runs_below_the_router_and_never_preempts_its_loop() -> None:
    async def run() -> bool:
        pool = ParserPool(processes=1)
        try:
            await pool.prepare(FINE, "chat", max_messages=10000)
            return batch_and_niced(pool.pids[0])
        finally:
            await pool.close()

    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the test's own loop: an ordinary task
    assert asyncio.run(run())


def test_a_parser_process_validates_as_the_router_would_and_names_the_field() -> None:
    bad_role = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 500}] * 150
                           + [{"role": "robot", "content": "hi"}]}).encode()
    bad_setting = json.dumps({"model": "m", "temperature": "hot", "prompt": "y" * 100_000}).encode()
    parts = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a" * 40_000}, {"type": "text", "text": "b" * 40_000}]}]}).encode()
    triton = json.dumps({"inputs": [{"name": "text_input", "data": ["z" * 100_000]}]}).encode()

    async def run() -> tuple[list[object], list[bytes]]:
        pool = ParserPool(processes=1)
        try:
            refused = await asyncio.gather(pool.prepare(bad_role, "chat", 10000),
                                           pool.prepare(bad_setting, "completion", 10000),
                                           return_exceptions=True)
            prepared = [await pool.prepare(parts, "chat", 10000), await pool.prepare(triton, "object", 10000)]
            return refused, prepared
        finally:
            await pool.close()

    (role, setting), (joined, triton_body) = asyncio.run(run())
    assert isinstance(role, APIError) and role.status == 400 and role.param == "messages.150.role"
    assert isinstance(setting, APIError) and setting.status == 400 and setting.param == "temperature"
    # content parts are joined into the engine's text, as the router's own path does
    assert pickle.loads(joined).messages == [{"role": "user", "content": "a" * 40_000 + "\n" + "b" * 40_000}]
    assert pickle.loads(triton_body) == PreparedBody(json.loads(triton))  # any other object: parsed only


def test_a_prompt_that_cannot_fit_its_model_is_refused_where_it_was_parsed() -> None:
    """With the models' prompt bounds, a prompt whose fewest possible tokens (its bytes over the
    most bytes a token covers) and max_tokens exceed the context is a 400 from the parser process,
    under the model's name or an alias; one that may fit, or names a model of no known bound, is
    prepared as before."""
    bounds = encode_bounds({"m": PromptBound(2048, 16), "alias-of-m": PromptBound(2048, 16)})

    def body(**fields: object) -> bytes:
        return json.dumps({"model": "m", **fields}).encode()

    chat = json.dumps({"model": "alias-of-m", "messages": [{"role": "user", "content": "x" * 40_000}] * 2}).encode()
    completion = body(prompt="y" * 100_000)
    with_max_tokens = body(prompt="y" * 16 * 2000, max_tokens=100)  # at least 2,000 tokens, + 100 > 2,048
    fits = body(prompt="y" * 16 * 2000, max_tokens=40)
    unbounded = json.dumps({"model": "other", "prompt": "y" * 100_000}).encode()

    async def run() -> tuple[list[object], list[bytes]]:
        pool = ParserPool(processes=1)
        try:
            refused = await asyncio.gather(*(pool.prepare(b, kind, 10000, bounds) for b, kind in (
                (chat, "chat"), (completion, "completion"), (with_max_tokens, "completion"))), return_exceptions=True)
            prepared = [await pool.prepare(fits, "completion", 10000, bounds),
                        await pool.prepare(unbounded, "completion", 10000, bounds),
                        await pool.prepare(completion, "completion", 10000)]
            return refused, prepared
        finally:
            await pool.close()

    (chat_error, completion_error, max_tokens_error), prepared = asyncio.run(run())
    for error, param in ((chat_error, "messages"), (completion_error, "prompt"), (max_tokens_error, "prompt")):
        assert isinstance(error, APIError), error
        assert (error.status, error.param, error.code) == (400, param, "context_length_exceeded"), error.message
    assert isinstance(chat_error, APIError) and "'alias-of-m'" in chat_error.message
    assert "at least 5000 tokens" in chat_error.message  # 80,000 bytes of content / 16
    assert isinstance(max_tokens_error, APIError) and "max_tokens=100" in max_tokens_error.message
    assert [pickle.loads(p).data["model"] for p in prepared] == ["m", "other", "m"]


def test_a_triton_prompt_that_cannot_fit_the_paths_model_is_refused_where_it_was_parsed() -> None:
    """A Triton body names its model in its path: the router sends that model's bound alone. Its
    `text_input` (the generate extension's key, in any nesting of one; or the infer input of that
    name) is checked against it with the `max_tokens` of its parameters; a shape the router's own
    checks refuse is passed on to them, and so is a `binary_data_size`: the parser process sees the
    JSON alone, and only the router knows how many bytes follow it (`test_a_binary_prompt...`)."""
    bound = encode_bounds({"m": PromptBound(2048, 16)})
    too_long = "y" * 16 * 2000  # at least 2,000 tokens
    refused_bodies = [{"text_input": "y" * 40_000}, {"text_input": [[too_long]], "parameters": {"max_tokens": 100}},
                      {"inputs": [{"name": "stream", "datatype": "BOOL", "shape": [1], "data": [False]},
                                  {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["y" * 40_000]}]},
                      {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [too_long]},
                                  {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1],
                                   "data": ['{"max_tokens": 77}']}]},
                      {"text_input": too_long, "sampling_parameters": {"max_tokens": 78}}]
    passed_bodies = [{"text_input": too_long, "parameters": {"max_tokens": 40}},
                     {"text_input": [too_long, too_long]},  # two texts: the router refuses that shape
                     {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                  "parameters": {"binary_data_size": 4 + 40_000}}]}]

    async def run() -> tuple[list[object], list[bytes], bytes]:
        pool = ParserPool(processes=1)
        try:
            refused = await asyncio.gather(*(pool.prepare(json.dumps(b).encode(), "triton", 10000, bound)
                                             for b in refused_bodies), return_exceptions=True)
            passed = [await pool.prepare(json.dumps(b).encode(), "triton", 10000, bound) for b in passed_bodies]
            unbounded = await pool.prepare(json.dumps(refused_bodies[0]).encode(), "triton", 10000)
            return refused, passed, unbounded
        finally:
            await pool.close()

    refused, passed, unbounded = asyncio.run(run())
    for error in refused:
        assert isinstance(error, APIError), error
        assert (error.status, error.param, error.code) == (400, "text_input", "context_length_exceeded"), error
        assert "'m'" in error.message
    asked = [e.message.split("max_tokens=")[1].split(".")[0] if "max_tokens=" in e.message else None
             for e in refused if isinstance(e, APIError)]
    assert asked == [None, "100", None, "77", "78"]  # as asked, in parameters or sampling parameters
    assert isinstance(refused[0], APIError) and "no room is left for even one generated token" in refused[0].message
    assert [pickle.loads(p).data for p in passed] == passed_bodies
    assert pickle.loads(unbounded).data == refused_bodies[0]  # no bound known yet: the router checks it


def test_a_binary_prompt_is_counted_from_its_size_only_where_that_many_bytes_follow() -> None:
    """The router refuses a binary `text_input` that cannot fit from its `binary_data_size`, before
    reading it; a size larger than the bytes that follow the JSON is a lie, which the router's check
    of the binary data names (`binary_data_size ... does not fit`), not a prompt of that length."""
    bound = PromptBound(2048, 16)
    data = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": 4 + 40_000}}]}
    with pytest.raises(APIError) as refused:
        refuse_triton_prompt("m", bound, data, binary_bytes=4 + 40_000)
    assert (refused.value.status, refused.value.param) == (400, "text_input")
    assert "at least 2500 tokens" in refused.value.message
    refuse_triton_prompt("m", bound, data, binary_bytes=4 + 39_999)  # fewer bytes follow: not its prompt's
    refuse_triton_prompt("m", bound, data)  # none follow (a parser process, which sees the JSON alone)


def test_a_full_queue_is_a_503_with_retry_after_and_a_client_that_left_costs_no_parse() -> None:
    async def run() -> tuple[list[object], int, int]:
        pool = ParserPool(processes=1, queue=2)
        try:
            first = asyncio.create_task(pool.prepare(BIG, "chat", 10000))  # in the parser process
            await asyncio.sleep(0)
            gone = asyncio.create_task(pool.prepare(BIG, "chat", 10000))  # waits, then its client leaves
            waiting = asyncio.create_task(pool.prepare(FINE, "chat", 10000))
            await asyncio.sleep(0)
            with pytest.raises(APIError) as full:
                await pool.prepare(FINE, "chat", 10000)
            gone.cancel()
            outcomes = await asyncio.gather(first, gone, waiting, return_exceptions=True)
            assert full.value.status == 503 and full.value.headers == {"Retry-After": "1"}
            return outcomes, pool.checked, pool.skipped
        finally:
            await pool.close()

    (first, gone, waiting), checked, skipped = asyncio.run(run())
    assert isinstance(first, APIError) and first.status == 400
    assert isinstance(gone, asyncio.CancelledError)
    assert isinstance(waiting, bytes) and pickle.loads(waiting).messages[0] == {"role": "user", "content": "x" * 500}
    assert (checked, skipped) == (2, 1)  # the body whose client left never reached the parser process


HOLDER = textwrap.dedent("""
    import asyncio, json, sys
    from clearml_umem.router.parser_pool import ParserPool

    async def main():
        pool = ParserPool(processes=2)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}] * 20000}).encode()
        await asyncio.gather(pool.prepare(body, "chat", 100000), pool.prepare(body, "chat", 100000))
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


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_body_in_a_memory_file_is_parsed_from_its_pages_and_leaves_no_descriptor_behind() -> None:
    """A body a thread read from its client's socket (`body_handoff.SharedBody`) goes to the parser
    process as a descriptor, not through the pipe: prepared and refused as the same bytes would be,
    and neither process keeps a descriptor or a mapping of it afterwards."""
    def shared(raw: bytes) -> SharedBody:
        body = SharedBody(len(raw))
        os.pwrite(body.fd, raw, 0)
        return body

    async def run() -> tuple[object, object, int, bool, int, list[str]]:
        pool = ParserPool(processes=1)
        try:
            await pool.prepare(FINE, "chat", 10000)  # the process started, its descriptors settled
            child = pool.pids[0]
            ours, theirs = _descriptors(os.getpid()), _descriptors(child)
            for _ in range(20):
                prepared = await pool.prepare(shared(FINE), "chat", 10000)
                refused = await asyncio.gather(pool.prepare(shared(BIG), "chat", 10000), return_exceptions=True)
            # each body's descriptor is closed by a body thread once the body is let go
            assert wait_until(lambda: _descriptors(os.getpid()) == ours), "a descriptor left open in the router"
            grown = _descriptors(child) - theirs
            mapped = [m.path for m in psutil.Process(child).memory_maps(grouped=False) if "umem-body" in m.path]
            return prepared, refused[0], pool.checked, pool.pids[0] == child, grown, mapped
        finally:
            await pool.close()

    payload, error, checked, same_process, grown, mapped = asyncio.run(run())
    assert pickle.loads(payload).messages == [{"role": "user", "content": "x" * 500}] * 200
    assert isinstance(error, APIError) and error.status == 400 and error.code == "too_many_messages"
    assert checked == 41 and same_process
    assert grown == 0, "no descriptor left open in the parser process"
    assert mapped == [], "no body left mapped in the parser process"


def test_parser_and_reader_processes_import_neither_the_app_nor_its_web_framework() -> None:
    """Each parser process starts at the first big body, which waits for it: what it imports is paid
    then (the app and FastAPI doubled its start, 0.55 s against 0.25 s, and took 14 MB more)."""
    code = ("import sys, clearml_umem.parser_child, clearml_umem.body_reader_child; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'torch') "
            "or m in ('clearml_umem.router.app', 'clearml_umem.runtime')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
