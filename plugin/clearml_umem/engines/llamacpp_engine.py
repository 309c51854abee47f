"""A llama.cpp `llama-server` process per GGUF model, tiered as llama.cpp allows.

llama.cpp cannot move a loaded model's layers between the GPU and host memory (`n_gpu_layers`
is fixed at load; a vLLM-like sleep was asked for upstream and closed as stale), so the tiers
are built around the file instead of the process:

- gpu: the server runs with every layer offloaded (`-ngl all`) on a CUDA build, or on the CPU
  build with the CPU as its "device" (`-ngl 0`).
- ram: no server; the router holds the GGUF file in host memory (mapped and locked,
  `resident_file.ResidentFile`; counted in the host budget), so a start reads it from RAM,
  not disk. A swap-in from ram is a process start plus the upload from memory.
- disk: no server; the file is on local disk and the kernel is advised to drop its pages.
- cold: no server, nothing prepared. For a local file this holds what disk holds; they are
  kept apart so that the scheduler, the metrics and the demo treat every engine alike.

Every pair of tiers has a direct step (`LLAMACPP_MOVES`): nothing passes through a transit.

The process is `vllm_process.VLLMProcess` with llama-server's command line: its own process
group, no orphans (PDEATHSIG and a watchdog, `engines.process`), one start at a time per
device (`start_gate`), restarted once when it dies, logs under the work dir. It listens on a
Unix socket in a private 0700 directory (llama-server takes `--host PATH.sock`) where the
binary supports it, else on 127.0.0.1 with a per-start random `--api-key` (handed over in
the environment, `LLAMA_API_KEY`): only the router reaches it.

Footprints come from the GGUF header (`gguf_file`): the tensor bytes plus the KV cache for
the served context plus a compute allowance; no per-model setting is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from clearml_umem.engines.base import (
    Delta,
    EngineContext,
    EngineError,
    Footprint,
    GenerationRequest,
    InvalidRequest,
    MoveResult,
)
from clearml_umem.engines.llama_server import ServerAbilities, abilities, find_llama_server
from clearml_umem.engines.llamacpp_api import adapt_body, check_options, template_takes_tools
from clearml_umem.engines.moves import MoveTable
from clearml_umem.engines.openai_stream import generate_restarting_once, openai_body, stream_answer
from clearml_umem.engines.progress import last_log_line
from clearml_umem.engines.prompt_check import PromptBound, prompt_text, refuse_if_cannot_fit
from clearml_umem.engines.request_decoding import shaped
from clearml_umem.engines.resident_file import ResidentFile, cached_bytes, drop_from_page_cache
from clearml_umem.engines.start_gate import START_GATES
from clearml_umem.engines.vllm_process import Endpoint, ProcessConfig, ProcessTimeouts, VLLMProcess
from clearml_umem.gguf_file import GGUFError, GGUFInfo, read_gguf
from clearml_umem.spec import ModelSpec
from clearml_umem.tiers import Tier
from clearml_umem.units import fmt_bytes

log = logging.getLogger(__name__)

MiB = 2**20
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_PARALLEL = 4
"""Slots per server: requests decoded in one batch. Four concurrent requests of a small model
took 0.65x the time of one slot here on 2 CPU cores (one slot queues them inside llama-server);
on a GPU, where decoding is memory-bound, batching gains more. Each slot costs a served
context of KV cache."""
"""Served context when the manifest sets none: a GGUF declares its training context (often
32k-128k tokens), whose KV cache would dwarf a small model's weights."""
CPU_OVERHEAD_BYTES = 32 * MiB
"""Compute buffers and the process beside weights and KV cache, on the CPU build."""
CUDA_OVERHEAD_BYTES = 384 * MiB
"""The CUDA context and compute buffers of a fully offloaded server, before logits."""
UBATCH = 512
"""llama.cpp's default micro-batch: the logits buffer is vocabulary x this many floats."""
STOP_GRACE_S = 5.0
"""llama-server exits at once on SIGTERM; SIGKILL after this."""
START_TIMEOUT_S = 300.0
"""Loading a large GGUF from a slow disk; a tiny one is ready in well under a second."""


class Step(enum.Enum):
    """What one direct step between two tiers does."""

    START = "start the server"
    STOP_HOLD = "stop the server, hold the file in RAM"
    STOP_DROP = "stop the server, drop the file from memory"
    HOLD = "hold the file in RAM"
    RELEASE_DROP = "release the file, drop it from memory"
    NOTHING = "nothing"


LLAMACPP_MOVES: MoveTable[Step] = MoveTable({
    (Tier.COLD, Tier.GPU): Step.START,
    (Tier.DISK, Tier.GPU): Step.START,
    (Tier.RAM, Tier.GPU): Step.START,
    (Tier.GPU, Tier.RAM): Step.STOP_HOLD,
    (Tier.GPU, Tier.DISK): Step.STOP_DROP,
    (Tier.GPU, Tier.COLD): Step.STOP_DROP,
    (Tier.COLD, Tier.RAM): Step.HOLD,
    (Tier.DISK, Tier.RAM): Step.HOLD,
    (Tier.RAM, Tier.DISK): Step.RELEASE_DROP,
    (Tier.RAM, Tier.COLD): Step.RELEASE_DROP,
    (Tier.COLD, Tier.DISK): Step.NOTHING,
    (Tier.DISK, Tier.COLD): Step.NOTHING,
})


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class LlamaCppEngine:
    """One GGUF model served by its own llama-server process.

    Options (`EngineContext.options`; a model's `spec.extra` overrides them): `llama_server`
    (the binary; else UMEM_LLAMA_SERVER, PATH, the install script's cache), `max_context`
    (cap on the served context, default 4096; the manifest's `context_length` lowers it),
    `parallel` (slots, `-np`, default 4: requests decoded together, each with the whole served
    context), `n_gpu_layers` (default: all on CUDA, 0 on the CPU),
    `lock_ram` (default True: mlock the RAM tier; False maps and touches only),
    `process_overhead_bytes`, `start_timeout_s`, `request_timeout_s`, `stop_grace_s`,
    `llama_args` (extra CLI arguments), `env` (extra environment).
    """

    def __init__(self, spec: ModelSpec, ctx: EngineContext) -> None:
        self.spec = spec
        self.ctx = ctx
        opts: dict[str, Any] = {**ctx.options, **dict(spec.extra or {})}
        self._opts = opts
        try:
            self.gguf: GGUFInfo = read_gguf(spec.weights)
            self.template_takes_tools = template_takes_tools(self.gguf.metadata.get("tokenizer.chat_template"))
        except GGUFError as exc:
            raise EngineError(f"model {spec.name!r} cannot be served by llama.cpp: {exc}") from exc
        self.binary = find_llama_server(opts.get("llama_server"))
        self._abilities: ServerAbilities | None = None
        self.cuda = ctx.device.startswith("cuda") or (ctx.device == "auto" and _cuda_present())
        self.parallel = max(1, int(opts.get("parallel", DEFAULT_PARALLEL)))
        self.n_ctx = self._served_context(opts)
        try:
            # llama-server splits -c between its slots: each slot gets the served context, so the
            # KV cache holds parallel x n_ctx tokens
            self.kv_cache_bytes = self.gguf.kv_bytes_per_token() * self.kv_tokens
        except GGUFError as exc:
            raise EngineError(f"model {spec.name!r} cannot be served by llama.cpp: {exc}") from exc
        vocab = self.gguf.array_lengths.get("tokenizer.ggml.tokens", 0)
        default_overhead = (CUDA_OVERHEAD_BYTES if self.cuda else CPU_OVERHEAD_BYTES) + 4 * vocab * UBATCH
        self.process_overhead_bytes = int(opts.get("process_overhead_bytes", default_overhead))
        self.lock_ram = _truthy(opts.get("lock_ram", True))
        log_dir = Path(ctx.log_dir) if ctx.log_dir else Path(ctx.work_dir) / "logs"
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.name)
        self.log_file = log_dir / f"llamacpp-{safe}.log"
        timeouts = ProcessTimeouts.from_options({"start_timeout_s": START_TIMEOUT_S, "stop_grace_s": STOP_GRACE_S,
                                                 **opts})
        self._process: VLLMProcess | None = None
        self._timeouts = timeouts
        self.resident: ResidentFile | None = None
        self.last_hold: dict[str, Any] | None = None
        self._tier = Tier.COLD
        self._lock: asyncio.Lock | None = None
        self._step_now: tuple[Step, float] | None = None
        self._closes = 0
        log.info("model %s (llamacpp): %s %s, %s of tensors, KV cache %s for %d tokens", spec.name,
                 self.gguf.architecture, self.gguf.quantization, fmt_bytes(self.gguf.tensor_bytes),
                 fmt_bytes(self.kv_cache_bytes), self.kv_tokens)

    def start_problem(self) -> str | None:
        """What stops every start of this model, known without starting it: no llama-server binary."""
        if self.binary is None:
            return ("no llama-server binary: build one with scripts/install-llama-server.sh, or point "
                    "--llama-server / UMEM_LLAMA_SERVER at one, then restart")
        if not os.access(self.binary, os.X_OK):
            return f"llama-server {self.binary} is not an executable file"
        try:
            abilities(self.binary)
        except (OSError, ValueError) as exc:
            return f"cannot run llama-server {self.binary}: {exc}"
        return None

    @property
    def kv_tokens(self) -> int:
        """llama-server's `-c`: the served context for each of its `parallel` slots."""
        return self.n_ctx * self.parallel

    @property
    def served_context(self) -> int:
        """The context llama-server runs with (`-c`), which the router lists and checks requests against."""
        return self.n_ctx

    def _served_context(self, opts: dict[str, Any]) -> int:
        cap = int(opts.get("max_context", DEFAULT_MAX_CONTEXT))
        declared = [c for c in (self.spec.context_length, self.gguf.context_length) if c]
        n_ctx = min([cap, *declared])
        if n_ctx <= 0:
            raise EngineError(f"model {self.spec.name!r}: served context must be positive, got {n_ctx}")
        return n_ctx

    # -- the process -------------------------------------------------------------------------

    @property
    def process(self) -> VLLMProcess:
        """Built at the first start: finding and asking the binary is deferred until it is needed,
        so that a catalog with GGUF models loads (and budgets) where llama-server is not installed."""
        if self._process is None:
            if self.binary is None:
                raise EngineError(f"model {self.spec.name!r}: no llama-server found; build one with "
                                  f"scripts/install-llama-server.sh, or point --llama-server / UMEM_LLAMA_SERVER "
                                  f"at one")
            try:
                self._abilities = abilities(self.binary)
            except (OSError, ValueError) as exc:
                raise EngineError(f"model {self.spec.name!r}: cannot run llama-server {self.binary}: {exc}") from exc
            if self.cuda and not self._abilities.cuda:
                log.warning("model %s: %s has no CUDA backend; the model runs on the CPU", self.spec.name,
                            self.binary)
            self._process = VLLMProcess(
                ProcessConfig(name=self.spec.name, log_file=self.log_file, command=self.command,
                              environment=self.environment, timeouts=self._timeouts, program=(self.binary,),
                              label="llama-server", unix_socket=self._abilities.unix_socket,
                              key_env="LLAMA_API_KEY", allow_tcp=True),
                START_GATES.for_device(self.ctx.device))
        return self._process

    @property
    def n_gpu_layers(self) -> str:
        option = self._opts.get("n_gpu_layers")
        if option is not None:
            return str(option)
        return "all" if self.cuda else "0"

    def command(self, endpoint: Endpoint) -> list[str]:
        """llama-server's argv; the key (TCP only) goes in the environment, not here where /proc shows it."""
        assert self.binary is not None
        host = str(endpoint.socket) if endpoint.socket is not None else "127.0.0.1"
        cmd = [self.binary, "-m", str(self.spec.weights), "--host", host, "--port", str(endpoint.port or 8080),
               "--alias", self.spec.name, "-c", str(self.kv_tokens), "-np", str(self.parallel),
               "-ngl", self.n_gpu_layers]
        ab = self._abilities
        if self.cuda and ab is not None and ab.cuda:
            # one GPU, as the device budget counts: llama.cpp would split the layers over every GPU it sees
            index = self.ctx.device.split(":", 1)[1] if ":" in self.ctx.device else "0"
            cmd += ["--device", f"CUDA{index}"]
        if ab is not None and ab.no_webui:
            cmd.append("--no-webui")
        if ab is not None and ab.load_mode:
            cmd += ["--load-mode", "mmap"]
        if ab is not None and ab.jinja:
            cmd.append("--jinja")  # the model's own template: tools, tool calls in the conversation
        cmd.extend(str(a) for a in self._opts.get("llama_args") or ())
        return cmd

    def environment(self) -> dict[str, str]:
        """The router's environment without llama.cpp's own settings: llama-server reads every
        option from a `LLAMA_ARG_*` variable too, and an inherited one would override what the
        command line says (a host, a port, an API key)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LLAMA_ARG_") and k not in ("LLAMA_API_KEY", "LLAMA_ARG_API_KEY")}
        env.update({str(k): str(v) for k, v in (self._opts.get("env") or {}).items()})
        return env

    # -- what the scheduler asks -------------------------------------------------------------

    @property
    def tiers(self) -> frozenset[Tier]:
        return LLAMACPP_MOVES.tiers

    @property
    def transits(self) -> dict[tuple[Tier, Tier], Tier]:
        return LLAMACPP_MOVES.transits

    quick_check = True
    """`check_request` counts bytes, no tokenizer: the runtime runs it on the event loop for a small request."""

    @property
    def max_concurrency(self) -> int:
        """One request per server slot (`-np`): more would only queue inside llama-server."""
        return self.parallel

    def footprint(self, tier: Tier) -> Footprint:
        """GPU: the tensors, the KV cache for the served context and the compute allowance;
        ram: the whole file in host memory; disk and cold: nothing."""
        if tier is Tier.GPU:
            return Footprint(device_bytes=self.gguf.tensor_bytes + self.kv_cache_bytes + self.process_overhead_bytes)
        if tier is Tier.RAM:
            return Footprint(host_bytes=self.gguf.file_size)
        return Footprint()

    def check_request(self, request: GenerationRequest) -> None:
        """Refuse before any move what can never fit the served context, without a tokenizer.

        A token's text in the vocabulary is never shorter than the prompt bytes it covers (byte
        tokens and SentencePiece's `▁` are longer), so bytes / the longest token's bytes is a
        lower bound of the prompt's tokens: what this refuses llama-server would refuse too,
        after a swap-in. Prompts it lets through that are still too long get llama-server's own
        400 (naming the prompt as well). max_tokens over the served context is refused outright,
        as the other engines do."""
        check_options(self.spec.name, request)
        param = "messages" if request.is_chat else "prompt"
        if request.max_tokens > self.n_ctx:
            raise InvalidRequest(f"model {self.spec.name!r} is served with a context of {self.n_ctx} tokens; "
                                 f"max_tokens={request.max_tokens} can never fit", param="max_tokens")
        bound = self.prompt_bound()
        if bound is not None:
            refuse_if_cannot_fit(self.spec.name, bound, len(prompt_text(request).encode("utf-8")),
                                 request.max_tokens, param)

    def prompt_bound(self) -> PromptBound | None:
        """The served context and the vocabulary's longest token, from the GGUF file alone."""
        longest = self.gguf.max_token_bytes
        return PromptBound(self.n_ctx, longest) if longest else None

    def died(self) -> str | None:
        """Why the server is gone though the model is on the GPU and no move runs; None while well."""
        if self._tier is not Tier.GPU or self._process is None or (self._lock is not None and self._lock.locked()):
            return None
        if self._process.running:
            return None
        code = self._process.returncode
        if code is None:
            return None
        return f"the llama-server process exited with code {code} while the model was in tier gpu"

    async def hung(self) -> str | None:
        """Why the server counts as hung (no progress on a request and no answer to /health); None while
        it works, and while a move runs (a start has its own timeout)."""
        if self._tier is not Tier.GPU or self._process is None or (self._lock is not None and self._lock.locked()):
            return None
        return await self._process.hung()

    def describe(self) -> dict[str, Any]:
        proc = self._process.describe() if self._process is not None else {}
        ab = self._abilities
        return {
            "engine": "llamacpp",
            "tier": self._tier.value,
            "tiers": sorted(t.value for t in self.tiers),
            "binary": self.binary,
            "cuda_build": ab.cuda if ab else None,
            "n_gpu_layers": self.n_gpu_layers,
            "pid": proc.get("pid"),
            "running": proc.get("running", False),
            "url": proc.get("url"),
            "transport": proc.get("transport"),
            "log_file": str(self.log_file),
            "restarts": proc.get("restarts", 0),
            "last_start_s": proc.get("last_start_s"),
            "context": self.n_ctx,
            "parallel": self.parallel,
            "kv_tokens": self.kv_tokens,
            "max_concurrency": self.max_concurrency,
            "kv_cache_bytes": self.kv_cache_bytes,
            "process_overhead_bytes": self.process_overhead_bytes,
            "gguf": self.gguf.summary(),
            "ram_tier": self._ram_state(),
        }

    def progress(self) -> dict[str, Any] | None:
        """The step under way and, while the server starts, its own last log line (llama-server
        does not say how many bytes it has loaded), or None when no move runs."""
        now = self._step_now
        if now is None:
            return None
        step, since = now
        stage = step.value
        line = last_log_line(self.log_file) if step is Step.START else None
        if line:
            stage += f" (log: {line})"
        return {"stage": stage, "bytes_done": 0, "bytes_total": None, "percent": None,
                "stage_seconds": round(time.monotonic() - since, 3)}

    def _ram_state(self) -> dict[str, Any]:
        """How the RAM tier holds (or last held) the file: locked, or only mapped and touched, and why."""
        if self.resident is not None:
            return {"held": True, "locked": self.resident.locked, "lock_problem": self.resident.lock_problem,
                    "seconds": self.resident.seconds}
        return {"held": False, **(self.last_hold or {})}

    # -- moves -------------------------------------------------------------------------------

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def move(self, src: Tier, dst: Tier) -> MoveResult:
        """Run the one step of the move table from `src` to `dst` under the move lock."""
        for tier in (src, dst):
            if tier not in self.tiers:
                raise EngineError(f"model {self.spec.name!r}: llamacpp engine has no {tier.value} tier")
        async with self._get_lock():
            if src is dst:
                return MoveResult(bytes_moved=0)
            moved, host_copy = 0, None
            for _, step in LLAMACPP_MOVES.route(src, dst):
                self._step_now = (step, time.monotonic())
                try:
                    moved, host_copy = await self._run_step(step)
                finally:
                    self._step_now = None
            self._tier = dst
            return MoveResult(bytes_moved=moved, host_copy=host_copy)

    async def _run_step(self, step: Step) -> tuple[int, str | None]:
        if step is Step.START:
            await self.process.ensure_running()
            # the server holds the weights now (its mapping on the CPU, the device on CUDA)
            self._release()
            return self.gguf.tensor_bytes, None
        if step is Step.STOP_HOLD:
            await self._stop()
            return await self._hold()
        if step is Step.STOP_DROP:
            await self._stop()
            await self._drop()
            return 0, None
        if step is Step.HOLD:
            return await self._hold()
        if step is Step.RELEASE_DROP:
            await self._drop()
            return 0, None
        return 0, None

    async def _stop(self) -> None:
        if self._process is not None:
            await self._process.stop()

    async def _hold(self) -> tuple[int, str]:
        """Hold the file in RAM; 'kept' when its pages were all in memory already, else 'copied' (read from disk)."""
        if self.resident is not None:
            return 0, "kept"
        path = self.spec.weights
        before = await asyncio.to_thread(cached_bytes, path)
        closes = self._closes
        holding = asyncio.ensure_future(asyncio.to_thread(ResidentFile.hold, path, lock=self.lock_ram))
        try:
            resident = await asyncio.shield(holding)
        except asyncio.CancelledError:  # the thread reads on: what it holds is let go when it ends
            holding.add_done_callback(_release_unclaimed)
            raise
        except OSError as exc:
            raise EngineError(f"model {self.spec.name!r}: cannot hold {path} in RAM: {exc}") from exc
        if self._closes != closes:  # closed meanwhile (the server stopping): nothing would let it go
            resident.release()
            raise EngineError(f"model {self.spec.name!r}: closed while its file was being read into RAM")
        self.resident = resident
        if self.resident.lock_problem and self.lock_ram:
            log.warning("model %s: RAM tier %s", self.spec.name, self.resident.lock_problem)
        fully_cached = before is not None and before >= self.gguf.file_size
        return self.gguf.file_size, "kept" if fully_cached else "copied"

    def _release(self) -> None:
        resident, self.resident = self.resident, None
        if resident is not None:
            self.last_hold = {"locked": resident.locked, "lock_problem": resident.lock_problem,
                              "seconds": resident.seconds}
            resident.release()

    async def _drop(self) -> None:
        self._release()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(drop_from_page_cache, self.spec.weights)

    # -- generation --------------------------------------------------------------------------

    async def _restart_if_dead(self, incarnation: int) -> None:
        async with self._get_lock():
            if self._tier is not Tier.GPU:
                # closed under the request (found hung, or dead): the scheduler counts it cold now
                raise EngineError(f"model {self.spec.name!r}: llama-server was stopped under this request")
            await self.process.restart_if_dead(incarnation)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream from llama-server (closing the iterator makes it stop generating); a server found
        dead before any text was sent is restarted and the request retried once."""
        return generate_restarting_once(self.spec.name, "llama-server", self.process,
                                        lambda: self._stream(request), self._restart_if_dead)

    def _stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        path, body = openai_body(self.spec.name, request)
        top_logprobs, shape_calls = adapt_body(body, request, self.template_takes_tools)

        def refuse(status: int, message: str) -> Exception:
            if status != 400:
                return EngineError(f"model {self.spec.name!r}: llama-server answered {status}: {message}")
            # llama-server's own refusal: a prompt over the served context ("exceeds the available
            # context size") names the prompt, as the other engines' check before any move does
            over = "context size" in message
            return InvalidRequest(f"model {self.spec.name!r}: {message}",
                                  param=("messages" if request.is_chat else "prompt") if over else None,
                                  code="context_length_exceeded" if over else None)

        answer = stream_answer(self.process, path, body, request.is_chat, "llama-server", refuse,
                               top_logprobs=top_logprobs)
        return shaped(answer, request) if shape_calls else answer

    async def close(self) -> None:
        """Stop the server and let the file go; a later move from cold starts it again."""
        self._tier = Tier.COLD  # first: a request that sees the server go now fails instead of starting it again
        self._closes += 1
        if self._process is not None:
            await self._process.close()
        self._release()


def _release_unclaimed(holding: asyncio.Future[ResidentFile]) -> None:
    if not holding.cancelled() and holding.exception() is None:
        holding.result().release()


def _cuda_present() -> bool:
    return Path("/dev/nvidiactl").exists()
