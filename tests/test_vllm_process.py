"""The vLLM server process on its own (against the fake server), its start gate, and the vLLM move tables."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from clearml_umem.engines import vllm_process
from clearml_umem.engines.start_gate import StartGate, StartGates
from clearml_umem.engines.vllm_engine import AWAKE_ONLY_MOVES, SLEEP_MODE_MOVES, Step
from clearml_umem.engines.vllm_process import (
    SOCKETS,
    Endpoint,
    EngineError,
    ProcessConfig,
    ProcessTimeouts,
    SocketDirectory,
    VLLMProcess,
    allow_tcp_from,
    rejects_uds,
)
from clearml_umem.tiers import Tier
from tests.waiting import wait_until

GPU, RAM, DISK, COLD = Tier.GPU, Tier.RAM, Tier.DISK, Tier.COLD
FAKE = Path(__file__).parent / "fixtures" / "fake_vllm_server.py"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="engine processes need Linux")


@pytest.mark.parametrize(("src", "dst", "steps"), [
    (COLD, GPU, [(GPU, Step.START)]),
    (GPU, RAM, [(RAM, Step.SLEEP_RAM)]),
    (GPU, DISK, [(DISK, Step.SLEEP_DISK)]),
    (RAM, GPU, [(GPU, Step.WAKE)]),
    (DISK, GPU, [(GPU, Step.WAKE)]),
    (RAM, DISK, [(DISK, Step.STOP)]),
    (COLD, RAM, [(GPU, Step.START), (RAM, Step.SLEEP_RAM)]),
    (COLD, DISK, [(GPU, Step.START), (DISK, Step.SLEEP_DISK)]),
    (DISK, RAM, [(GPU, Step.WAKE), (RAM, Step.SLEEP_RAM)]),
    (GPU, COLD, [(COLD, Step.STOP)]),
    (RAM, COLD, [(COLD, Step.STOP)]),
    (DISK, COLD, [(COLD, Step.STOP)]),
])
def test_sleep_mode_moves(src: Tier, dst: Tier, steps: list) -> None:
    assert SLEEP_MODE_MOVES.route(src, dst) == steps


def test_without_sleep_mode_a_server_runs_or_is_stopped() -> None:
    assert AWAKE_ONLY_MOVES.tiers == frozenset({GPU, COLD}) and AWAKE_ONLY_MOVES.transits == {}
    assert AWAKE_ONLY_MOVES.route(COLD, GPU) == [(GPU, Step.START)]
    assert AWAKE_ONLY_MOVES.route(GPU, COLD) == [(COLD, Step.STOP)]


def test_one_gate_per_device() -> None:
    gates = StartGates()
    assert gates.for_device("cuda:0") is gates.for_device("cuda:0")
    assert gates.for_device("cuda:1") is not gates.for_device("cuda:0")
    assert gates.for_device("cuda:1").device == "cuda:1"


def test_a_gate_lets_one_start_through_at_a_time_in_each_loop() -> None:
    gate = StartGate("cuda")
    order: list[str] = []

    async def start(name: str) -> None:
        async with gate.turn():
            order.append(f"{name} in")
            await asyncio.sleep(0.05)
            order.append(f"{name} out")

    async def both() -> bool:
        first = asyncio.create_task(start("a"))
        await asyncio.sleep(0)
        busy = gate.busy
        await asyncio.gather(first, start("b"))
        return busy

    assert asyncio.run(both()) is True
    assert order == ["a in", "a out", "b in", "b out"]
    assert asyncio.run(both()) is True, "a new event loop gets a lock of its own"


@pytest.fixture
def fake_process(tmp_path: Path) -> Iterator[VLLMProcess]:
    state = tmp_path / "state"
    state.mkdir()
    (state / "behaviour.json").write_text(json.dumps({}))
    config = ProcessConfig(
        name="m", log_file=tmp_path / "vllm-m.log",
        command=lambda endpoint: [sys.executable, str(FAKE), "--model", "m", *endpoint.args()],
        environment=lambda: {**os.environ, "FAKE_VLLM_STATE": str(state)},
        timeouts=ProcessTimeouts(start_s=20.0, stop_grace_s=3.0))
    proc = VLLMProcess(config, StartGate("cpu"))
    yield proc
    asyncio.run(proc.close())


@linux_only
def test_ensure_running_starts_once_and_again_after_a_death(fake_process: VLLMProcess) -> None:
    async def go() -> list[bool]:
        started = [await fake_process.ensure_running(), await fake_process.ensure_running()]
        assert fake_process.incarnation == 1 and (await fake_process.client().get("/health")).status_code == 200
        assert fake_process.pid is not None
        os.kill(fake_process.pid, signal.SIGKILL)
        assert await asyncio.to_thread(wait_until, lambda: not fake_process.running, 5)
        started.append(await fake_process.ensure_running())
        return started

    assert asyncio.run(go()) == [True, False, True]
    assert fake_process.restarts == 1 and fake_process.incarnation == 2
    assert fake_process.describe()["running"] and fake_process.last_start_s is not None


@linux_only
def test_a_close_while_the_launch_runs_stops_the_process_it_launched(fake_process: VLLMProcess,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """close() during the launch call (a thread) finds no process to stop yet: the start sees the close
    once the launch returns and stops what it launched, instead of waiting minutes for it to be healthy."""
    import threading

    from clearml_umem.engines.base import EngineError

    launched: list[int] = []
    closed = threading.Event()
    real_launch = vllm_process.process.launch

    def launch_then_wait_for_the_close(*args: object, **kwargs: object) -> object:
        proc = real_launch(*args, **kwargs)
        launched.append(proc.pid)
        assert closed.wait(10), "the test did not close the process"
        return proc

    monkeypatch.setattr(vllm_process.process, "launch", launch_then_wait_for_the_close)
    # a large model: its socket opens minutes after the launch
    state = Path(fake_process.config.environment()["FAKE_VLLM_STATE"])
    (state / "behaviour.json").write_text(json.dumps({"startup_delay_s": 300}))

    async def race() -> None:
        starting = asyncio.create_task(fake_process.ensure_running())
        assert await asyncio.to_thread(wait_until, lambda: bool(launched), 10)
        await fake_process.close()
        closed.set()
        with pytest.raises(EngineError, match="engine closed while vLLM was starting"):
            await asyncio.wait_for(starting, 10)

    asyncio.run(race())
    assert not fake_process.running
    assert wait_until(lambda: not psutil.pid_exists(launched[0]) or
                      psutil.Process(launched[0]).status() == psutil.STATUS_ZOMBIE, 10)


@linux_only
def test_restart_if_dead_leaves_a_newer_process_alone(fake_process: VLLMProcess) -> None:
    async def go() -> None:
        await fake_process.ensure_running()
        seen = fake_process.incarnation
        assert fake_process.pid is not None
        os.kill(fake_process.pid, signal.SIGKILL)
        assert await asyncio.to_thread(wait_until, lambda: not fake_process.running, 5)
        assert await fake_process.restart_if_dead(seen) is True
        assert await fake_process.restart_if_dead(seen) is False, "another caller restarted it already"

    asyncio.run(go())
    assert fake_process.restarts == 1 and fake_process.incarnation == 2


@linux_only
def test_stop_and_close(fake_process: VLLMProcess) -> None:
    async def go() -> None:
        await fake_process.ensure_running()
        await fake_process.stop()
        assert fake_process.pid is None and not fake_process.running and fake_process.describe()["url"] is None
        await fake_process.close()
        await fake_process.close()

    asyncio.run(go())


def listening_inet(pid: int) -> list[object]:
    """The TCP/UDP sockets the process `pid` and its descendants listen on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return [c for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)]


def connect_as_nobody(path: Path) -> str | None:
    """Try the socket from another user's process: "refused: ..." or "connected"; None where no
    Python here can run as that user (this one may live under a directory only we can open)."""
    nobody = pwd.getpwnam("nobody")
    as_nobody = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": [], "capture_output": True,
                 "text": True, "timeout": 30}
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept OSError as exc:\n    print('refused:', exc)\n"
            "else:\n    print('connected')\n")
    for python in dict.fromkeys(p for p in (sys.executable, "/usr/bin/python3", shutil.which("python3")) if p):
        try:
            if subprocess.run([python, "-I", "-S", "-c", "pass"], **as_nobody).returncode != 0:
                continue
        except OSError:
            continue
        out = subprocess.run([python, "-I", "-S", "-c", code, str(path)], **as_nobody)
        return out.stdout.strip() or out.stderr.strip()
    return None


@linux_only
def test_only_the_router_reaches_the_server(fake_process: VLLMProcess) -> None:
    """The server listens on a Unix socket in a directory private to this user, and on no TCP port;
    another user cannot even connect. (Any process of the same user can, as it could ptrace the
    router anyway.)"""
    async def go() -> tuple[Endpoint, Path]:
        await fake_process.ensure_running()
        endpoint = fake_process.endpoint
        assert endpoint.transport == "uds" and endpoint.socket is not None and endpoint.directory is not None
        assert (await fake_process.client().get("/health")).status_code == 200
        info = fake_process.describe()
        assert info["url"] == f"unix:{endpoint.socket}" and info["socket"] == str(endpoint.socket)
        assert info["transport"] == "uds"
        assert fake_process.pid is not None
        assert listening_inet(fake_process.pid) == [], "the server must not listen on any TCP/UDP port"
        for directory in (SOCKETS.path, endpoint.directory):
            assert directory is not None
            st = os.lstat(directory)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
            assert st.st_uid == os.geteuid()
        assert endpoint.directory.parent == SOCKETS.path
        assert stat.S_ISSOCK(os.lstat(endpoint.socket).st_mode)
        assert len(os.fsencode(str(endpoint.socket))) <= vllm_process.MAX_SOCKET_PATH_BYTES
        if os.geteuid() == 0:
            answer = await asyncio.to_thread(connect_as_nobody, endpoint.socket)
            assert answer is None or answer.startswith("refused:") and "Permission denied" in answer, answer
        root = SOCKETS.path
        await fake_process.stop()
        assert not endpoint.directory.exists(), "a stopped server's socket directory is removed"
        with pytest.raises(EngineError, match="not running"):
            fake_process.client()
        await fake_process.close()
        return endpoint, root

    endpoint, root = asyncio.run(go())
    assert root is not None and not root.exists(), "the directory goes once every engine is closed"
    gone = httpx.HTTPTransport(uds=str(endpoint.socket))
    with pytest.raises(httpx.TransportError), httpx.Client(transport=gone) as client:
        client.get("http://localhost/health")


@linux_only
def test_each_launch_gets_a_fresh_socket(fake_process: VLLMProcess) -> None:
    async def go() -> list[Endpoint]:
        await fake_process.ensure_running()
        first = fake_process.endpoint
        assert fake_process.pid is not None
        os.kill(fake_process.pid, signal.SIGKILL)
        assert await asyncio.to_thread(wait_until, lambda: not fake_process.running, 5)
        await fake_process.ensure_running()
        second = fake_process.endpoint
        assert first.directory is not None and not first.directory.exists()
        assert (await fake_process.client().get("/health")).status_code == 200
        return [first, second]

    first, second = asyncio.run(go())
    assert first.socket != second.socket and first.directory is not None and second.directory is not None
    assert first.directory.parent == second.directory.parent, "one directory per router process"


def test_socket_directory_is_private_and_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / ("long" * 20)))
    (tmp_path / ("long" * 20)).mkdir()
    monkeypatch.setattr(vllm_process.tempfile, "tempdir", None)
    sockets = SocketDirectory()
    one, two = object(), object()
    a = sockets.acquire(one, "a" * 200)
    b = sockets.acquire(two, "model/with spaces")
    assert sockets.path is not None and str(sockets.path).startswith("/tmp/umem-"), "a long TMPDIR is not used"
    assert a.parent == b.parent == sockets.path and b.name.startswith("model_with_spaces-")
    assert len(os.fsencode(str(a / vllm_process.SOCKET_NAME))) <= vllm_process.MAX_SOCKET_PATH_BYTES
    for d in (sockets.path, a, b):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    sockets.release(a)
    assert not a.exists() and b.exists()
    sockets.close(one)
    assert b.exists(), "the second engine still uses the directory"
    sockets.release(b)
    assert b.parent.exists(), "kept while an engine that used it is not closed (a restart reuses it)"
    sockets.close(two)
    assert not b.parent.exists() and sockets.path is None
    again = sockets.acquire(one, "m")
    assert again.parent.is_dir()
    sockets.remove_all()
    assert not again.parent.exists()


def test_directories_of_routers_that_died_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A router killed with -9 runs no exit handler: the next one removes what it left."""
    monkeypatch.setattr(SocketDirectory, "_base", staticmethod(lambda: str(tmp_path)))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"umem-{gone.pid}-abc"
    living = tmp_path / f"umem-{os.getppid()}-def"
    unrelated = tmp_path / "umem-notapid-x"
    for d in (dead, living, unrelated):
        (d / "m-1").mkdir(parents=True, mode=0o700)
    sockets = SocketDirectory()
    owner = object()
    sub = sockets.acquire(owner, "m")
    try:
        assert sockets.path is not None and sockets.path.name.startswith(f"umem-{os.getpid()}-")
        assert not dead.exists(), "its router is gone"
        assert living.exists() and unrelated.exists()
    finally:
        sockets.release(sub)
        sockets.close(owner)


def test_socket_directory_that_is_not_private_is_refused() -> None:
    sockets = SocketDirectory()
    owner = object()
    sub = sockets.acquire(owner, "m")
    assert sockets.path is not None
    os.chmod(sockets.path, 0o755)
    try:
        with pytest.raises(EngineError, match="not private"):
            sockets.acquire(owner, "m")
    finally:
        sockets.release(sub)
        sockets.close(owner)
    assert sockets.path is None


def test_endpoints() -> None:
    uds = Endpoint(directory=Path("/tmp/umem-x/m-1"))
    assert uds.args() == ["--uds", "/tmp/umem-x/m-1/api.sock"] and uds.url == "unix:/tmp/umem-x/m-1/api.sock"
    assert uds.environment() == {"VLLM_RPC_BASE_PATH": "/tmp/umem-x/m-1"}
    tcp = Endpoint(port=4321, api_key="k")
    assert tcp.args() == ["--host", "127.0.0.1", "--port", "4321"] and tcp.url == "http://127.0.0.1:4321"
    assert tcp.environment() == {"VLLM_API_KEY": "k"}, "the key goes in the environment, never in argv"
    assert "k" not in repr(tcp)


def test_a_rejected_uds_is_recognised_in_the_latest_launch_only() -> None:
    err = "usage: api_server.py [-h] ...\napi_server.py: error: unrecognized arguments: --uds /tmp/umem-x/m-1/api.sock"
    assert rejects_uds("===== 2026 umem starting: python -m vllm --uds /tmp/a\n" + err)
    assert not rejects_uds("===== 2026 umem starting: python -m vllm --uds /tmp/a\nCUDA out of memory")
    assert not rejects_uds(err + "\n===== 2026 umem starting: python -m vllm --uds /tmp/b\nKilled")
    assert rejects_uds("error: no such option: --uds")


def test_allow_tcp_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vllm_process.ALLOW_TCP_ENV, raising=False)
    assert allow_tcp_from(None) is False and allow_tcp_from(True) is True and allow_tcp_from("yes") is True
    monkeypatch.setenv(vllm_process.ALLOW_TCP_ENV, "1")
    assert allow_tcp_from(None) is True and allow_tcp_from(False) is False, "the option wins over the environment"
