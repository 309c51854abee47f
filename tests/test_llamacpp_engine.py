"""The llamacpp engine without llama-server: footprints from the file, its command line and
environment, its move table, and the RAM and disk tiers on a real file (mlock, page cache)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from clearml_umem.engines import EngineContext, EngineError, create_engine
from clearml_umem.engines.llamacpp_engine import LLAMACPP_MOVES, LlamaCppEngine
from clearml_umem.engines.resident_file import ResidentFile, cached_bytes, drop_from_page_cache
from clearml_umem.engines.vllm_process import Endpoint
from clearml_umem.gguf_file import read_gguf
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tiers import Footprint, Tier

pytest.importorskip("gguf", reason="the gguf package (test extra) writes the tiny GGUF models")

from clearml_umem.tinygguf import TinyGGUF, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", TinyGGUF("m", "q8_0", context_length=1024))


def _engine(model: Path, tmp_path: Path, **options) -> LlamaCppEngine:
    spec = spec_from_mapping({"name": "m", "weights": str(model)})
    engine = create_engine(spec, EngineContext(work_dir=tmp_path, device="cpu", options=options))
    assert isinstance(engine, LlamaCppEngine)
    return engine


def test_footprints_come_from_the_file(model: Path, tmp_path: Path) -> None:
    engine = _engine(model, tmp_path, process_overhead_bytes=1000)
    info = read_gguf(model)
    assert engine.n_ctx == 1024, "the file's context, under the 4096 default cap"
    assert engine.parallel == 4 and engine.kv_tokens == 4 * 1024, "four slots, each with the whole context"
    assert engine.footprint(Tier.GPU).device_bytes == info.tensor_bytes + info.kv_bytes_per_token() * 4096 + 1000
    assert engine.footprint(Tier.GPU).host_bytes == 0
    assert engine.footprint(Tier.RAM).host_bytes == model.stat().st_size
    assert engine.footprint(Tier.RAM).device_bytes == 0
    assert engine.footprint(Tier.DISK) == Footprint() and engine.footprint(Tier.COLD) == Footprint()
    smaller = _engine(model, tmp_path, max_context=256, parallel=1)
    assert smaller.n_ctx == 256 and smaller.kv_cache_bytes == info.kv_bytes_per_token() * 256


def test_every_move_is_one_direct_step(model: Path, tmp_path: Path) -> None:
    engine = _engine(model, tmp_path)
    assert engine.tiers == frozenset(Tier) and engine.transits == {}
    for src in Tier:
        for dst in Tier:
            if src is not dst:
                assert len(LLAMACPP_MOVES.route(src, dst)) == 1


def test_the_command_line_carries_no_key_and_the_environment_no_llama_settings(model: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(model, tmp_path, llama_server="/opt/llama-server")
    over_tcp = engine.command(Endpoint(port=4321, api_key="secret-key"))
    assert "secret-key" not in over_tcp and over_tcp[over_tcp.index("--host") + 1] == "127.0.0.1"
    assert over_tcp[over_tcp.index("--port") + 1] == "4321" and over_tcp[over_tcp.index("-ngl") + 1] == "0"
    assert over_tcp[over_tcp.index("-np") + 1] == "4" and over_tcp[over_tcp.index("--alias") + 1] == "m"
    assert over_tcp[over_tcp.index("-c") + 1] == "4096", "llama-server splits -c between its slots"
    over_socket = engine.command(Endpoint(directory=tmp_path))
    assert over_socket[over_socket.index("--host") + 1] == str(tmp_path / "api.sock")
    monkeypatch.setenv("LLAMA_ARG_HOST", "0.0.0.0")
    monkeypatch.setenv("LLAMA_API_KEY", "inherited")
    env = engine.environment()
    assert "LLAMA_ARG_HOST" not in env and "LLAMA_API_KEY" not in env and env["PATH"] == os.environ["PATH"]


def test_without_a_binary_a_start_fails_with_how_to_get_one(model: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clearml_umem.engines.llamacpp_engine.find_llama_server", lambda option=None: None)
    engine = _engine(model, tmp_path)
    with pytest.raises(EngineError, match="install-llama-server.sh"):
        asyncio.run(engine.move(Tier.COLD, Tier.GPU))
    assert engine.describe()["binary"] is None


def test_ram_holds_the_file_in_memory_and_disk_lets_it_go(model: Path, tmp_path: Path) -> None:
    engine = _engine(model, tmp_path)
    size = model.stat().st_size

    async def visit() -> None:
        result = await engine.move(Tier.COLD, Tier.RAM)
        assert result.bytes_moved == size and result.host_copy in ("kept", "copied")
        ram = engine.describe()["ram_tier"]
        assert ram["held"] and (ram["locked"] or "mapped and touched" in ram["lock_problem"])
        drop_from_page_cache(model)  # a locked (or mapped) file stays all the same
        assert cached_bytes(model) == size
        await engine.move(Tier.RAM, Tier.DISK)
        assert engine.describe()["ram_tier"]["held"] is False
        assert cached_bytes(model) == 0, "disk: the kernel was told to drop the file"
        await engine.move(Tier.DISK, Tier.RAM)
        assert cached_bytes(model) == size
        await engine.close()
        assert engine.describe()["tier"] == "cold" and engine.describe()["ram_tier"]["held"] is False

    asyncio.run(visit())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mlock and RLIMIT_MEMLOCK as Linux has them")
def test_without_room_to_lock_the_file_is_mapped_and_touched_and_says_why(model: Path) -> None:
    """As a non-root user with the default 8 MiB RLIMIT_MEMLOCK: here the limit is set lower than
    the file and, when the tests run as root, the child drops to nobody (root may lock anything)."""
    shared = Path(tempfile.mkdtemp(prefix="umem-mlock-"))
    try:
        shared.chmod(0o755)
        copy = shared / "m.gguf"
        copy.write_bytes(model.read_bytes())
        copy.chmod(0o644)
        code = (
            "import os, resource, sys\n"
            "from clearml_umem.engines.resident_file import ResidentFile, cached_bytes\n"
            "resource.setrlimit(resource.RLIMIT_MEMLOCK, (4096, 4096))\n"
            "if os.geteuid() == 0:\n"
            "    os.setgid(65534); os.setuid(65534)\n"
            "held = ResidentFile.hold(sys.argv[1])\n"
            "print(held.locked, cached_bytes(sys.argv[1]) == os.path.getsize(sys.argv[1]))\n"
            "print(held.lock_problem)\n"
            "held.release()\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert out.returncode == 0, out.stderr
        first, problem = out.stdout.strip().splitlines()
        assert first == "False True", "not locked, but every page is in memory"
        assert "mlock refused" in problem and "RLIMIT_MEMLOCK allows 4096 bytes" in problem
        assert "mapped and touched" in problem
    finally:
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_hold_locks_where_allowed(model: Path) -> None:
    held = ResidentFile.hold(model, lock=False)
    try:
        assert held.locked is False and "not asked" in (held.lock_problem or "")
        assert cached_bytes(model) == model.stat().st_size
    finally:
        held.release()


def test_progress_names_the_step_under_way(model: Path, tmp_path: Path) -> None:
    engine = _engine(model, tmp_path)
    assert engine.progress() is None

    async def hold_and_look() -> dict | None:
        seen: list[dict | None] = []
        original = engine._hold

        async def spying_hold():  # noqa: ANN202 - the engine's own coroutine, wrapped
            seen.append(engine.progress())
            return await original()

        engine._hold = spying_hold  # type: ignore[method-assign]
        await engine.move(Tier.COLD, Tier.RAM)
        await engine.close()
        return seen[0]

    during = asyncio.run(hold_and_look())
    assert during is not None and during["stage"] == "hold the file in RAM" and during["stage_seconds"] >= 0
    assert engine.progress() is None


def test_on_cuda_every_layer_goes_to_the_one_gpu_of_the_budget(model: Path, tmp_path: Path) -> None:
    from clearml_umem.engines.llama_server import ServerAbilities

    spec = spec_from_mapping({"name": "m", "weights": str(model)})
    engine = LlamaCppEngine(spec, EngineContext(work_dir=tmp_path, device="cuda:1",
                                                options={"llama_server": "/opt/llama-server"}))
    engine._abilities = ServerAbilities(unix_socket=True, cuda=True, load_mode=True, no_webui=True)
    cmd = engine.command(Endpoint(directory=tmp_path))
    assert cmd[cmd.index("-ngl") + 1] == "all" and cmd[cmd.index("--device") + 1] == "CUDA1"
    assert engine.footprint(Tier.GPU).device_bytes > engine.gguf.tensor_bytes + 384 * 2**20
    engine._abilities = ServerAbilities(unix_socket=True, cuda=False, load_mode=True, no_webui=True)
    assert "--device" not in engine.command(Endpoint(directory=tmp_path)), "a CPU build has no CUDA device"


def test_requests_that_can_never_fit_are_refused_without_a_tokenizer(model: Path, tmp_path: Path) -> None:
    from clearml_umem.engines import GenerationRequest, InvalidRequest

    engine = _engine(model, tmp_path)
    longest = engine.gguf.max_token_bytes
    assert longest == len("<|assistant|>"), "the longest token of the tiny vocabulary"
    engine.check_request(GenerationRequest(prompt="x" * (longest * (1024 - 8)), max_tokens=8))
    with pytest.raises(InvalidRequest) as err:
        engine.check_request(GenerationRequest(prompt="x" * (longest * (1024 - 8) + 1), max_tokens=8))
    assert err.value.param == "prompt" and err.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest) as err:
        engine.check_request(GenerationRequest(messages=[{"role": "user", "content": "y" * longest * 2000}]))
    assert err.value.param == "messages"
    with pytest.raises(InvalidRequest) as err:
        engine.check_request(GenerationRequest(prompt="hi", max_tokens=1025))
    assert err.value.param == "max_tokens"


def test_the_router_lists_and_checks_the_served_context_not_the_files(model: Path, tmp_path: Path) -> None:
    """The file allows 1024 tokens, the server runs with 256: clients are told 256 and held to it."""
    from clearml_umem.runtime import Runtime

    spec = spec_from_mapping({"name": "m", "weights": str(model)})
    assert spec.context_length == 1024
    runtime = Runtime(2**30, 2**30, EngineContext(work_dir=tmp_path, device="cpu", options={"max_context": 256}))
    runtime.add_model(spec)
    assert runtime.spec("m").context_length == 256


def _gated_hold(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event, list[ResidentFile]]:
    """ResidentFile.hold made to wait, once `holding` is set, until the test sets `gate`; what it
    held goes to the list."""
    gate, holding = threading.Event(), threading.Event()
    held: list[ResidentFile] = []
    hold = ResidentFile.hold

    def gated_hold(path: Path, lock: bool = True) -> ResidentFile:
        holding.set()
        gate.wait(10)
        held.append(hold(path, lock=lock))
        return held[-1]

    monkeypatch.setattr(ResidentFile, "hold", staticmethod(gated_hold))
    return gate, holding, held


def test_a_close_while_the_file_is_being_held_lets_it_go_when_the_hold_ends(model: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A close (the server stopping) during the RAM tier's hold, a read of the whole file in a
    thread: the hold ends after the close, and its file is let go then, not held until the process
    exits; the move fails instead of reporting a tier the engine no longer has."""
    gate, holding, held = _gated_hold(monkeypatch)
    engine = _engine(model, tmp_path)

    async def close_during_hold() -> None:
        moving = asyncio.ensure_future(engine.move(Tier.COLD, Tier.RAM))
        await asyncio.to_thread(holding.wait, 10)
        await engine.close()
        gate.set()
        with pytest.raises(EngineError, match="closed"):
            await moving

    asyncio.run(close_during_hold())
    assert engine.resident is None and engine.describe()["ram_tier"]["held"] is False
    assert engine.describe()["tier"] == "cold"
    assert len(held) == 1 and not held[0].held


def test_a_hold_given_up_on_lets_its_file_go_when_its_read_ends(model: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The move cancelled during the hold (its thread cannot be stopped): the file it ends up
    holding is let go then, not left mapped and locked with nothing to release it."""
    gate, holding, held = _gated_hold(monkeypatch)
    engine = _engine(model, tmp_path)

    async def cancel_during_hold() -> None:
        moving = asyncio.ensure_future(engine.move(Tier.COLD, Tier.RAM))
        await asyncio.to_thread(holding.wait, 10)
        moving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await moving
        gate.set()
        for _ in range(200):
            if held and not held[0].held:
                break
            await asyncio.sleep(0.01)

    asyncio.run(cancel_during_hold())
    assert len(held) == 1 and not held[0].held
    assert engine.resident is None
