"""One model's vLLM server process: started, waited on, restarted, stopped, and talked to.

The engine (`vllm_engine`) decides which tier a model is in and which sleep or wake call a
move needs; this class only makes sure there is a healthy server to send them to, and
carries them over HTTP. `ensure_running()` is how the engine gets one. Below it,
`engines.process` owns the process group and its watchdog, so no server outlives the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clearml_umem.engines import process
from clearml_umem.engines.base import EngineError, EngineOutOfMemory
from clearml_umem.engines.start_gate import StartGate

log = logging.getLogger("clearml_umem.engines.vllm_engine.process")
"""Under the engine's logger: what an operator sets for vLLM engines covers their processes too."""

START_TIMEOUT_S = 600.0
"""A cold start loads weights and, on GPU, captures CUDA graphs: minutes for large models."""

CONTROL_TIMEOUT_S = 300.0
"""Sleep and wake copy the weights between device and host: tens of seconds for large models."""

REQUEST_TIMEOUT_S = 600.0
"""Reading one generation: a long answer from a loaded server takes minutes."""

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


class EngineUnreachable(EngineError):
    """No HTTP answer at all (connection refused or dropped): the process may be dying."""


class EngineStartTimeout(EngineError):
    """vLLM did not answer /health in time; not retried, a second wait would double a long one."""


def looks_out_of_memory(text: str) -> bool:
    """Whether a vLLM error body or log tail reports a failed allocation."""
    return bool(_OOM_PATTERNS.search(text or ""))


def error_message(body: bytes) -> str:
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


@dataclass(frozen=True)
class ProcessTimeouts:
    """How long to wait on the server, from the engine options of the same names."""

    start_s: float = START_TIMEOUT_S
    control_s: float = CONTROL_TIMEOUT_S
    request_s: float = REQUEST_TIMEOUT_S
    stop_grace_s: float = STOP_GRACE_S

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> ProcessTimeouts:
        return cls(start_s=float(opts.get("start_timeout_s", START_TIMEOUT_S)),
                   control_s=float(opts.get("control_timeout_s", CONTROL_TIMEOUT_S)),
                   request_s=float(opts.get("request_timeout_s", REQUEST_TIMEOUT_S)),
                   stop_grace_s=float(opts.get("stop_grace_s", STOP_GRACE_S)))


@dataclass(frozen=True)
class ProcessConfig:
    """What the process needs from its engine to launch a server."""

    name: str
    """The served model's name, for messages."""
    log_file: Path
    command: Callable[[int], list[str]]
    """The server's argv for a port; called at every launch, each of which gets a fresh port."""
    environment: Callable[[], dict[str, str]]
    """Called at every launch, so a server sees the environment of that moment."""
    timeouts: ProcessTimeouts = field(default_factory=ProcessTimeouts)


class VLLMProcess:
    """The server of one model on 127.0.0.1 and a free port, or none.

    `incarnation` counts launches, so a caller that saw one process die can tell whether
    someone else has started the next already. `restarts` counts starts that replaced a
    process which died or failed (the admin view shows it).
    """

    def __init__(self, config: ProcessConfig, gate: StartGate) -> None:
        self.config = config
        self.gate = gate
        self.incarnation = 0
        self.restarts = 0
        self.last_start_s: float | None = None
        self._proc: process.ManagedProcess | None = None
        self._port: int | None = None
        self._client: httpx.AsyncClient | None = None
        self._client_key: tuple[asyncio.AbstractEventLoop, int] | None = None
        self._close_epoch = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit code of the last process, None while it runs or when there is none."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def url(self) -> str:
        if self._port is None:
            raise EngineError(f"model {self.config.name!r}: vLLM is not running")
        return f"http://127.0.0.1:{self._port}"

    def describe(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "running": self.running,
            "url": f"http://127.0.0.1:{self._port}" if self._port is not None else None,
            "log_file": str(self.config.log_file),
            "restarts": self.restarts,
            "last_start_s": self.last_start_s,
        }

    async def ensure_running(self) -> bool:
        """A healthy server: the one running, else a new one (then True). One found dead counts as a restart."""
        if self.running:
            return False
        if self._proc is not None:
            log.warning("model %s: vLLM process %s exited (code %s); starting a new one", self.config.name,
                        self._proc.pid, self._proc.returncode)
            self.restarts += 1
        await self._start()
        return True

    async def restart(self) -> None:
        """Replace a server that runs but no longer does what it is asked (a failed wake)."""
        self.restarts += 1
        await self.stop()
        await self._start()

    async def restart_if_dead(self, incarnation: int) -> bool:
        """Start again the server of `incarnation`, which was seen dead; False when a later one already runs.

        Callers hold the engine's move lock, so two requests that saw the same process die
        start one new server between them, not two.
        """
        if self.incarnation != incarnation and self.running:
            return False
        if self._proc is not None:
            log.warning("model %s: vLLM process %d exited (code %s); restarting", self.config.name,
                        self._proc.pid, self._proc.returncode)
        self.restarts += 1
        await self._start()
        return True

    async def stop(self) -> None:
        proc, self._proc, self._port = self._proc, None, None
        await self._drop_client()
        if proc is not None:
            code = await asyncio.to_thread(proc.stop, self.config.timeouts.stop_grace_s)
            log.info("model %s: vLLM process %d stopped (code %s)", self.config.name, proc.pid, code)

    async def close(self) -> None:
        """Stop, and make a start in progress or waiting at the gate fail instead of launching."""
        self._close_epoch += 1
        await self.stop()

    async def exits_within(self, seconds: float) -> bool:
        """Whether the process is gone, waiting a moment: a dropped connection arrives a little before
        the dying server can be reaped."""
        end = time.monotonic() + seconds
        while self.running:
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.05)
        return True

    def client(self) -> httpx.AsyncClient:
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
                                             timeout=httpx.Timeout(self.config.timeouts.request_s, connect=10.0),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=32,
                                                                 keepalive_expiry=KEEPALIVE_EXPIRY_S))
            self._client_key = key
        return self._client

    async def control(self, method: str, path: str, *, params: Any = None, json_body: Any = None) -> Any:
        """One call to the server's dev endpoints (sleep, wake...); its JSON answer, or None when empty."""
        try:
            resp = await self.client().request(method, path, params=params, json=json_body,
                                               timeout=self.config.timeouts.control_s)
        except httpx.HTTPError as exc:
            raise EngineUnreachable(f"model {self.config.name!r}: {method} {path} failed: "
                                    f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 400:
            message = error_message(resp.content)
            text = f"model {self.config.name!r}: {method} {path} answered {resp.status_code}: {message}"
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
                raise EngineError(f"model {self.config.name!r}: engine closed while vLLM was starting") from exc
            log.warning("model %s: vLLM failed to start (%s); trying once more", self.config.name, exc)
            self.restarts += 1
            await self._start_once()

    async def _start_once(self) -> None:
        if self._proc is not None:
            await self.stop()
        epoch = self._close_epoch
        if self.gate.busy:
            log.info("model %s: waiting for another vLLM engine to finish starting on %s", self.config.name,
                     self.gate.device)
        async with self.gate.turn():
            if self._close_epoch != epoch:
                raise EngineError(f"model {self.config.name!r}: engine closed while waiting to start")
            await self._launch_and_wait()

    async def _launch_and_wait(self) -> None:
        port = process.free_port()
        cmd = self.config.command(port)
        started = time.monotonic()
        proc = await asyncio.to_thread(process.launch, cmd, log_path=self.config.log_file,
                                       env=self.config.environment())
        self._proc, self._port = proc, port
        self.incarnation += 1
        log.info("model %s: starting vLLM (pid %d, port %d, log %s)", self.config.name, proc.pid, port,
                 self.config.log_file)
        try:
            await self._wait_healthy(proc, started)
        except BaseException:
            await self.stop()
            raise
        self.last_start_s = time.monotonic() - started
        log.info("model %s: vLLM healthy after %.1f s", self.config.name, self.last_start_s)

    async def _wait_healthy(self, proc: process.ManagedProcess, started: float) -> None:
        name, log_file = self.config.name, self.config.log_file
        deadline = started + self.config.timeouts.start_s
        next_progress = started + PROGRESS_EVERY_S
        client = self.client()
        while True:
            if not proc.alive():
                tail = proc.log_tail()
                text = (f"model {name!r}: vLLM exited with code {proc.returncode} while starting; "
                        f"log {log_file}:\n{tail[-3000:]}")
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
                raise EngineStartTimeout(f"model {name!r}: vLLM not healthy after "
                                         f"{self.config.timeouts.start_s:.0f} s; log {log_file}:\n{tail}")
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                last = proc.log_tail(1).strip()
                log.info("model %s: waiting for vLLM to become healthy (%.0f s; last log line: %s)",
                         name, now - started, last[-200:])
            await asyncio.sleep(0.25)

    async def _drop_client(self) -> None:
        client, self._client, self._client_key = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
