"""One model's vLLM server process: started, waited on, restarted, stopped, and talked to.

The engine (`vllm_engine`) decides which tier a model is in and which sleep or wake call a
move needs; this class only makes sure there is a healthy server to send them to, and
carries them over HTTP. `ensure_running()` is how the engine gets one. Below it,
`engines.process` owns the process group and its watchdog, so no server outlives the router.

Only the router may reach a server: it runs with `VLLM_SERVER_DEV_MODE=1`, whose endpoints
(`/sleep`, `/wake_up`, `/collective_rpc`, ...) vLLM never authenticates, not even with
`--api-key` (which guards only `/v1`, `/v2`, `/inference` and `/cohere` in vLLM 0.32). So a
server listens on a Unix socket (`--uds`) in a directory only this user can open (0700,
`SocketDirectory`), never on a TCP port. A vLLM without `--uds` is refused, unless the
`allow_tcp` option (or UMEM_VLLM_ALLOW_TCP=1) accepts the weaker fallback: 127.0.0.1 and a
random key per launch, which covers vLLM's `/v1` routes and nothing else.

The llama.cpp engine runs `llama-server` with this same class (`ProcessConfig.label`,
`unix_socket`, `key_env`): one process-group, watchdog, socket and restart machinery for both.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clearml_umem.engines import process
from clearml_umem.engines.base import EngineError, EngineOutOfMemory
from clearml_umem.engines.engine_http import drop_spare
from clearml_umem.engines.start_gate import StartGate

ENGINE_LOGGERS = {"vLLM": "clearml_umem.engines.vllm_engine.process",
                  "llama-server": "clearml_umem.engines.llamacpp_engine.process"}
"""Each server's lines under its engine's logger (by `ProcessConfig.label`): what an operator sets
for one engine covers its processes too, and llama-server's lines never read as vLLM's."""

START_TIMEOUT_S = 600.0
"""A cold start loads weights and, on GPU, captures CUDA graphs: minutes for large models."""

CONTROL_TIMEOUT_S = 300.0
"""Sleep and wake copy the weights between device and host: tens of seconds for large models."""

REQUEST_TIMEOUT_S = 600.0
"""Reading one generation: a long answer from a loaded server takes minutes."""

STOP_GRACE_S = 15.0
"""vLLM shuts its engine core down cleanly on SIGTERM within seconds; SIGKILL after this."""

STALL_TIMEOUT_S = 30.0
"""A server that sends no byte this long while a request is in flight is asked /health; one that
does not answer that either is hung (a long prompt's prefill sends nothing, but /health answers)."""

HEALTH_TIMEOUT_S = 5.0
"""How long a hung-looking server has to answer /health (at most the stall timeout)."""

PROGRESS_EVERY_S = 10.0

KEEPALIVE_EXPIRY_S = 3.0

ALLOW_TCP_ENV = "UMEM_VLLM_ALLOW_TCP"
"""Set to 1 to accept the TCP fallback for every vLLM engine (the `allow_tcp` engine option, for all)."""

SOCKET_NAME = "api.sock"

MAX_SOCKET_PATH_BYTES = 100
"""AF_UNIX paths are limited to 107 bytes (108 with the NUL) on Linux, 103 on macOS."""

_REJECTS_UDS = re.compile(r"unrecognized arguments:.*--uds|no such option:\s*--uds|unknown option.*--uds")

_LAUNCH_MARKER = "umem starting:"
"""`engines.process.launch` writes a line with this before every launch into the shared log file."""

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


class EngineNoUnixSocket(EngineError):
    """This vLLM has no `--uds` and TCP was not allowed; not retried, it would fail the same way."""


class _RejectedUds(EngineError):
    """The server exited at start because it does not know `--uds` (vLLM builds before it)."""


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


def allow_tcp_from(option: object) -> bool:
    """The `allow_tcp` option, else UMEM_VLLM_ALLOW_TCP; off unless set to a true value."""
    value = option if option is not None else os.environ.get(ALLOW_TCP_ENV)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@dataclass(frozen=True)
class Endpoint:
    """Where one launch of a server listens: a Unix socket in a private directory, or (fallback) a
    loopback port with the key the server requires on its `/v1` routes."""

    directory: Path | None = None
    """The launch's own directory (0700), holding the socket and vLLM's ZMQ IPC sockets."""
    port: int | None = None
    api_key: str | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path | None:
        return self.directory / SOCKET_NAME if self.directory is not None else None

    @property
    def transport(self) -> str:
        return "uds" if self.directory is not None else "tcp"

    @property
    def url(self) -> str:
        """vLLM's own way of naming it: `unix:/path` or `http://127.0.0.1:port`."""
        return f"unix:{self.socket}" if self.socket is not None else f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        """The server's listening arguments (with `--uds`, vLLM ignores host and port; none are given)."""
        if self.socket is not None:
            return ["--uds", str(self.socket)]
        return ["--host", "127.0.0.1", "--port", str(self.port)]

    def environment(self) -> dict[str, str]:
        """Over a socket, vLLM's internal ZMQ IPC sockets go in the same private directory (instead
        of /tmp); over TCP, the key goes in the environment, not the command line that every local
        user can read in /proc."""
        if self.directory is not None:
            return {"VLLM_RPC_BASE_PATH": str(self.directory)}
        return {"VLLM_API_KEY": self.api_key or ""}


class SocketDirectory:
    """This router process's private directory for engine sockets.

    Made on first use by `tempfile.mkdtemp` (mode 0700, owned by this user: other users can
    neither list it nor connect to a socket in it). Each launch gets a subdirectory of its own
    (0700) with the API socket and vLLM's ZMQ IPC sockets, removed once that process stopped;
    the directory itself goes when every engine that used it is closed (the router's close),
    and at exit. A short base (TMPDIR, or /tmp when TMPDIR is long) keeps socket paths under
    the AF_UNIX limit, whatever the work directory. Its name carries the router's pid, so a
    router killed with -9 (no exit handler runs) leaves a directory the next router removes.
    """

    def __init__(self, prefix: str = "umem-") -> None:
        self.prefix = prefix
        self.path: Path | None = None
        self._owners: set[int] = set()
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)

    def acquire(self, owner: object, name: str) -> Path:
        """A new private subdirectory for one launch of `name`; `owner` holds the directory until `close(owner)`."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:24] or "engine"
        with self._lock:
            if self.path is None or not self.path.is_dir():
                self._remove_stale()
                self.path = Path(tempfile.mkdtemp(prefix=f"{self.prefix}{os.getpid()}-", dir=self._base()))
            self._check_private(self.path)
            sub = self.path / f"{safe}-{next(self._numbers)}"
            sub.mkdir(mode=0o700)
            self._check_private(sub)
            socket_path = sub / SOCKET_NAME
            if len(os.fsencode(str(socket_path))) > MAX_SOCKET_PATH_BYTES:
                shutil.rmtree(sub, ignore_errors=True)
                raise EngineError(f"engine socket path {socket_path} is longer than {MAX_SOCKET_PATH_BYTES} "
                                  f"bytes (the AF_UNIX limit); set TMPDIR to a shorter directory")
            self._owners.add(id(owner))
            return sub

    def release(self, sub: Path) -> None:
        """Remove one launch's subdirectory (its process has stopped)."""
        shutil.rmtree(sub, ignore_errors=True)

    def close(self, owner: object) -> None:
        """`owner` is done with the directory; the directory goes once no owner is left."""
        with self._lock:
            self._owners.discard(id(owner))
            if not self._owners and self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path = None

    def remove_all(self) -> None:
        with self._lock:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
            self._owners.clear()

    def _remove_stale(self) -> None:
        """Remove this user's directories left by routers that no longer run."""
        for path in Path(self._base()).glob(f"{self.prefix}*-*"):
            pid = path.name[len(self.prefix):].split("-", 1)[0]
            try:
                if not pid.isdigit() or os.lstat(path).st_uid != os.geteuid() or _alive(int(pid)):
                    continue
            except OSError:
                continue
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _base() -> str:
        base = tempfile.gettempdir()
        if len(os.fsencode(base)) > 40 and os.path.isdir("/tmp"):
            return "/tmp"
        return base

    @staticmethod
    def _check_private(path: Path) -> None:
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise EngineError(f"engine socket directory {path} is not private to this user "
                              f"(mode {st.st_mode & 0o777:o}, owner {st.st_uid}); refusing to use it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SOCKETS = SocketDirectory()
atexit.register(SOCKETS.remove_all)

_NO_UDS: set[tuple[str, ...]] = set()
"""Programs (interpreter and module) seen to reject `--uds`: learnt at their first launch, which
costs nothing where `--uds` works (asking `--help` first costs a vLLM import, ~20 s on 2 cores)."""


def rejects_uds(log_text: str) -> bool:
    """Whether the log of the latest launch ends in an argument error about `--uds`."""
    start = log_text.rfind(_LAUNCH_MARKER)
    if start >= 0:
        newline = log_text.find("\n", start)
        log_text = log_text[newline + 1:] if newline >= 0 else ""
    return bool(_REJECTS_UDS.search(log_text))


@dataclass(frozen=True)
class ProcessTimeouts:
    """How long to wait on the server, from the engine options of the same names."""

    start_s: float = START_TIMEOUT_S
    control_s: float = CONTROL_TIMEOUT_S
    request_s: float = REQUEST_TIMEOUT_S
    stop_grace_s: float = STOP_GRACE_S
    stall_s: float = STALL_TIMEOUT_S
    health_s: float = HEALTH_TIMEOUT_S

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> ProcessTimeouts:
        return cls(start_s=float(opts.get("start_timeout_s", START_TIMEOUT_S)),
                   control_s=float(opts.get("control_timeout_s", CONTROL_TIMEOUT_S)),
                   request_s=float(opts.get("request_timeout_s", REQUEST_TIMEOUT_S)),
                   stop_grace_s=float(opts.get("stop_grace_s", STOP_GRACE_S)),
                   stall_s=(stall := float(opts.get("stall_timeout_s", STALL_TIMEOUT_S))),
                   health_s=float(opts.get("health_timeout_s", min(HEALTH_TIMEOUT_S, stall))))


@dataclass(frozen=True)
class ProcessConfig:
    """What the process needs from its engine to launch a server."""

    name: str
    """The served model's name, for messages."""
    log_file: Path
    command: Callable[[Endpoint], list[str]]
    """The server's argv for an endpoint (`Endpoint.args()`); called at every launch, each of
    which gets a fresh socket (or port)."""
    environment: Callable[[], dict[str, str]]
    """Called at every launch, so a server sees the environment of that moment."""
    timeouts: ProcessTimeouts = field(default_factory=ProcessTimeouts)
    program: tuple[str, ...] = ()
    """What runs vLLM (its argv prefix): whether it takes `--uds` is learnt once per program."""
    allow_tcp: bool = False
    """Accept TCP on 127.0.0.1 with a per-launch key where vLLM has no `--uds` (else refuse)."""
    label: str = "vLLM"
    """The server's name in messages; the class also runs llama.cpp's `llama-server`."""
    unix_socket: bool = True
    """False for a server without a Unix socket option: always 127.0.0.1 with a per-launch key
    (whose routes the key guards: the isolation such a server has), never the refusal above."""
    key_env: str | None = None
    """Environment variable that hands the server its per-launch key (off the command line,
    which every local user can read in /proc); None: vLLM's VLLM_API_KEY."""


class VLLMProcess:
    """The server of one model on a private Unix socket (see the module docstring), or none.

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
        self._endpoint: Endpoint | None = None
        self._client: httpx.AsyncClient | None = None
        self._client_key: tuple[asyncio.AbstractEventLoop, Endpoint] | None = None
        self._close_epoch = 0
        self.streams = 0
        """Answers being streamed from the server now."""
        self._last_progress = time.monotonic()
        self._log = logging.getLogger(ENGINE_LOGGERS.get(config.label, f"clearml_umem.engines.{config.label}"))

    @contextlib.contextmanager
    def streaming(self) -> Iterator[Callable[[], None]]:
        """Count one answer in flight while the block runs; call what it yields at every byte received."""
        if self.streams == 0:
            self._last_progress = time.monotonic()
        self.streams += 1
        try:
            yield self._progressed
        finally:
            self.streams -= 1

    def _progressed(self) -> None:
        self._last_progress = time.monotonic()

    async def hung(self) -> str | None:
        """Why the server counts as hung: no byte for `stall_s` while an answer is in flight, and no
        answer to /health within `health_s`; None while it makes progress or says it is healthy."""
        if not self.streams or not self.running:
            return None
        quiet = time.monotonic() - self._last_progress
        if quiet < self.config.timeouts.stall_s:
            return None
        try:
            resp = await self.client().get("/health", timeout=self.config.timeouts.health_s)
            if resp.status_code == 200:
                return None
            answer = f"answered /health with {resp.status_code}"
        except (httpx.HTTPError, EngineError) as exc:
            answer = f"did not answer /health within {self.config.timeouts.health_s:g} s ({type(exc).__name__})"
        return (f"the {self.config.label} process {self.pid} sent nothing for {quiet:.0f} s with "
                f"{self.streams} request(s) in flight and {answer}: it is hung")
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
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise EngineError(f"model {self.config.name!r}: {self.config.label} is not running")
        return self._endpoint

    @property
    def url(self) -> str:
        """Where the server listens, `unix:/path` (or `http://127.0.0.1:port` in the TCP fallback)."""
        return self.endpoint.url

    def describe(self) -> dict[str, Any]:
        endpoint = self._endpoint
        return {
            "pid": self.pid,
            "running": self.running,
            "url": endpoint.url if endpoint is not None else None,
            "transport": endpoint.transport if endpoint is not None else None,
            "socket": str(endpoint.socket) if endpoint is not None and endpoint.socket is not None else None,
            "log_file": str(self.config.log_file),
            "restarts": self.restarts,
            "last_start_s": self.last_start_s,
        }

    async def ensure_running(self) -> bool:
        """A healthy server: the one running, else a new one (then True). One found dead counts as a restart."""
        if self.running:
            return False
        if self._proc is not None:
            self._log.warning("model %s: %s process %s exited (code %s); starting a new one", self.config.name,
                        self.config.label, self._proc.pid, self._proc.returncode)
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
            self._log.warning("model %s: %s process %d exited (code %s); restarting", self.config.name,
                              self.config.label, self._proc.pid, self._proc.returncode)
        self.restarts += 1
        await self._start()
        return True

    async def stop(self) -> None:
        """Stop the process, then remove its socket directory."""
        proc, self._proc = self._proc, None
        endpoint, self._endpoint = self._endpoint, None
        await self._drop_client()
        if endpoint is not None:
            # first: a server's HTTP thread waits on an idle connection, and may hold its stop up
            drop_spare(str(endpoint.socket) if endpoint.socket is not None else None, endpoint.port)
        try:
            if proc is not None:
                code = await asyncio.to_thread(proc.stop, self.config.timeouts.stop_grace_s)
                self._log.info("model %s: %s process %d stopped (code %s)", self.config.name, self.config.label,
                               proc.pid, code)
        finally:
            if endpoint is not None and endpoint.directory is not None:
                SOCKETS.release(endpoint.directory)

    async def close(self) -> None:
        """Stop, and make a start in progress or waiting at the gate fail instead of launching; the
        socket directory goes once every engine of this router is closed."""
        self._close_epoch += 1
        try:
            await self.stop()
        finally:
            SOCKETS.close(self)

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
        """One pooled client per process and event loop, connected to the server's socket.

        A new `httpx.AsyncClient` per request costs about 20 ms (it builds an SSL context even
        for plain HTTP), more than a hot first token, so requests, health checks and control
        calls share kept-alive connections. `trust_env=False`: a proxy from the environment
        must never see traffic to an engine. Idle connections are dropped after 3 s, before
        vLLM's server closes them (5 s, VLLM_HTTP_TIMEOUT_KEEP_ALIVE): reusing one the server
        is closing would fail a request for nothing. Over TCP (the fallback) every request
        carries the launch's key.
        """
        endpoint = self.endpoint
        key = (asyncio.get_running_loop(), endpoint)
        if self._client is None or self._client_key != key:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32,
                                  keepalive_expiry=KEEPALIVE_EXPIRY_S)
            if endpoint.socket is not None:
                transport = httpx.AsyncHTTPTransport(uds=str(endpoint.socket), limits=limits)
                base_url = "http://localhost"
            else:
                transport = httpx.AsyncHTTPTransport(limits=limits)
                base_url = endpoint.url
            headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else None
            self._client = httpx.AsyncClient(base_url=base_url, transport=transport, trust_env=False, headers=headers,
                                             timeout=httpx.Timeout(self.config.timeouts.request_s, connect=10.0))
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
        except (EngineOutOfMemory, EngineStartTimeout, EngineNoUnixSocket):
            raise
        except EngineError as exc:
            if self._close_epoch != epoch:
                raise EngineError(f"model {self.config.name!r}: engine closed while {self.config.label} "
                                  "was starting") from exc
            self._log.warning("model %s: %s failed to start (%s); trying once more", self.config.name,
                              self.config.label, exc)
            self.restarts += 1
            await self._start_once()

    async def _start_once(self) -> None:
        if self._proc is not None:
            await self.stop()
        epoch = self._close_epoch
        if self.gate.busy:
            self._log.info("model %s: waiting for another engine to finish starting on %s", self.config.name,
                     self.gate.device)
        async with self.gate.turn():
            if self._close_epoch != epoch:
                raise EngineError(f"model {self.config.name!r}: engine closed while waiting to start")
            await self._launch_and_wait()

    async def _launch_and_wait(self) -> None:
        """Launch on a Unix socket; where this vLLM turns out to have no `--uds`, over TCP if allowed."""
        program = self.config.program
        if not self.config.unix_socket:
            await self._launch_once(Endpoint(port=process.free_port(), api_key=secrets.token_urlsafe(32)))
            return
        if program not in _NO_UDS:
            try:
                await self._launch_once(Endpoint(directory=SOCKETS.acquire(self, self.config.name)))
                return
            except _RejectedUds:
                _NO_UDS.add(program)
        if not self.config.allow_tcp:
            raise EngineNoUnixSocket(
                f"model {self.config.name!r}: this vLLM ({' '.join(program) or 'its command'}) has no --uds option, "
                f"so its engine could only listen on a TCP port, where any local user could call its "
                f"unauthenticated dev endpoints (/sleep, /wake_up, /collective_rpc); refusing to start it. "
                f"Upgrade vLLM, or accept that with the engine option allow_tcp=true or {ALLOW_TCP_ENV}=1 "
                f"(log {self.config.log_file})")
        self._log.warning("model %s: vLLM has no --uds; listening on 127.0.0.1 with a per-launch API key, as allow_tcp "
                    "permits. The key guards only vLLM's /v1 routes: any local user can still call /sleep, "
                    "/wake_up, /collective_rpc, /metrics and the other non-/v1 routes", self.config.name)
        await self._launch_once(Endpoint(port=process.free_port(), api_key=secrets.token_urlsafe(32)))

    async def _launch_once(self, endpoint: Endpoint) -> None:
        try:
            cmd = self.config.command(endpoint)
            env = dict(self.config.environment())
            env.pop("VLLM_API_KEY", None)  # the router sends none over a socket; the fallback sets its own
            env.update(endpoint.environment())
            if self.config.key_env and endpoint.api_key:
                env.pop("VLLM_API_KEY", None)
                env[self.config.key_env] = endpoint.api_key
            started = time.monotonic()
            epoch = self._close_epoch
            proc = await asyncio.to_thread(process.launch, cmd, log_path=self.config.log_file, env=env)
        except BaseException:
            if endpoint.directory is not None:
                SOCKETS.release(endpoint.directory)
            raise
        self._proc, self._endpoint = proc, endpoint
        self.incarnation += 1
        self._log.info("model %s: starting %s (pid %d, on %s, log %s)", self.config.name, self.config.label, proc.pid,
                 endpoint.url,
                 self.config.log_file)
        try:
            if self._close_epoch != epoch:  # closed while the launch ran: its stop found no process yet
                raise EngineError(f"model {self.config.name!r}: engine closed while {self.config.label} was starting")
            await self._wait_healthy(proc, started, endpoint)
        except BaseException:
            await self.stop()
            raise
        self.last_start_s = time.monotonic() - started
        self._log.info("model %s: %s healthy after %.1f s", self.config.name, self.config.label, self.last_start_s)

    async def _wait_healthy(self, proc: process.ManagedProcess, started: float, endpoint: Endpoint) -> None:
        name, log_file = self.config.name, self.config.log_file
        deadline = started + self.config.timeouts.start_s
        next_progress = started + PROGRESS_EVERY_S
        client = self.client()
        # poll fast at first, then every 0.25 s: llama-server is healthy within tens of milliseconds,
        # so a fixed 0.25 s step would add up to that much to every swap-in; vLLM takes a minute anyway
        delay = 0.005
        while True:
            if not proc.alive():
                tail = proc.log_tail()
                text = (f"model {name!r}: {self.config.label} exited with code {proc.returncode} while starting; "
                        f"log {log_file}:\n{tail[-3000:]}")
                if endpoint.socket is not None and rejects_uds(tail):
                    raise _RejectedUds(text)
                if looks_out_of_memory(tail):
                    raise EngineOutOfMemory(text)
                raise EngineError(text)
            if client.is_closed:  # closed under the start (`close()`): the process is being stopped
                raise EngineError(f"model {name!r}: {self.config.label} was stopped while starting")
            with contextlib.suppress(httpx.HTTPError):
                resp = await client.get("/health", timeout=2.0)
                if resp.status_code == 200:
                    return
            now = time.monotonic()
            if now >= deadline:
                tail = proc.log_tail(15)[-2000:]
                raise EngineStartTimeout(f"model {name!r}: {self.config.label} not healthy after "
                                         f"{self.config.timeouts.start_s:.0f} s; log {log_file}:\n{tail}")
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                last = proc.log_tail(1).strip()
                self._log.info("model %s: waiting for %s to become healthy (%.0f s; last log line: %s)",
                         name, self.config.label, now - started, last[-200:])
            await asyncio.sleep(delay)
            delay = min(0.25, delay * 2)

    async def _drop_client(self) -> None:
        client, self._client, self._client_key = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
