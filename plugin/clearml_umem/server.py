"""Puts the pieces together: catalog, budgets, runtime, metrics and the HTTP router.

Used by the CLI, the ClearML serve task, the benchmark and the demo, so all of them
serve the same way.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from clearml_umem.banner import exposure_warning, start_banner, start_refusal
from clearml_umem.catalog import Catalog, CatalogSnapshot, ManifestCatalog
from clearml_umem.catalog_poller import CatalogPoller
from clearml_umem.config import ConfigError, ServeConfig
from clearml_umem.device_env import device_label
from clearml_umem.engines import EngineContext, create_engine
from clearml_umem.events import EventBus
from clearml_umem.keep_alive import parse_keep_alive
from clearml_umem.log_setup import UVICORN_LOGGING
from clearml_umem.long_lived import FreezeLongLived
from clearml_umem.loop_lag import watch_loop_lag
from clearml_umem.memory import Budgets, detect_budgets, resolve_device
from clearml_umem.metrics import Metrics
from clearml_umem.model_logs import RouterModelLog
from clearml_umem.policy import make_policy
from clearml_umem.router.app import create_app, handoff_routes
from clearml_umem.router.browser_guard import HostNames
from clearml_umem.router.connections import (
    ConnectionGate,
    ConnectionLimits,
    gated_listener,
    limited_protocol,
    quiet_accept_errors,
)
from clearml_umem.router.drain import Drain
from clearml_umem.runtime import EngineFactory, Runtime

log = logging.getLogger(__name__)

READY_PREFIX = "umem: serving on "
GRPC_PREFIX = "umem: triton grpc on "

GRPC_GRACE_S = 5.0
"""On stop, gRPC calls in flight get this long to end before they are cancelled."""

STOP_MARGIN_S = 3.0
"""After the stop's grace, the time streams get to send their closing error event before uvicorn
cancels what is left."""


class _Server(uvicorn.Server):
    """uvicorn re-raises the stop signal as soon as it stops listening, which would kill the
    process before the engines (vLLM processes) are released; we finish cleanup and exit
    normally instead. A stop first runs `on_stop` (queued requests answered, the grace begun)."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stop()
        await super().shutdown(sockets)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)
                if captured:
                    log.info("stopping on signal %s", ", ".join(str(s) for s in captured))
                    captured.clear()


def manifest_catalog(config: ServeConfig) -> Catalog:
    """The catalog the server builds by itself: a local manifest. A ClearML registry catalog is
    built at the edge (`clearml_io.catalogs.build_catalog`) and handed in, so the serving core
    never imports ClearML."""
    if not config.manifest:
        raise ConfigError("no catalog: give --manifest FILE, or build the registry catalog with "
                          "clearml_umem.clearml_io.catalogs.build_catalog and pass it in")
    return ManifestCatalog(config.manifest, default_engine=config.resolved_engine())


class UnifiedMemoryServer:
    def __init__(self, config: ServeConfig, catalog: Catalog | None = None,
                 engine_factory: EngineFactory = create_engine, budgets: Budgets | None = None) -> None:
        if catalog is None:
            config.validate()
        self.config = config
        self.catalog = catalog or manifest_catalog(config)
        self.budgets = budgets or detect_budgets(config.device, config.device_budget_bytes, config.host_budget_bytes)
        self.bus = EventBus()
        self.metrics = Metrics(self.bus)
        work = config.work_path
        options: dict[str, object] = {"host_copy": config.host_copy, "stall_timeout_s": config.engine_stall_seconds,
                                      "pipelined_swap_in": config.pipelined_swap_in, "batching": config.batching}
        if config.vllm_python:
            options["vllm_python"] = config.vllm_python
        if config.llama_server:
            options["llama_server"] = config.llama_server
        context = EngineContext(work_dir=work, device=config.device, device_budget_bytes=self.budgets.device_bytes,
                                host_budget_bytes=self.budgets.host_bytes, log_dir=work / "logs", options=options)
        self.runtime = Runtime(self.budgets.device_bytes, self.budgets.host_bytes, context,
                               policy=make_policy(config.policy), bus=self.bus, engine_factory=engine_factory,
                               max_waiting=config.max_waiting, fairness=config.fairness_window != "off",
                               keep_alive_s=parse_keep_alive(config.keep_alive), device_kind=self.budgets.device_kind)
        self.model_log = RouterModelLog()
        self.drain = Drain()
        self.device = device_label(resolve_device(config.device))
        """Which card this router serves, as the clearml-agent gave it (`host/cuda:0=GPU 3`)."""
        self.app = create_app(self.runtime, self.metrics, config.api_key, max_body_bytes=config.max_request_body,
                              admin_key=config.admin_key, model_log=self.model_log,
                              hosts=HostNames.for_listen_address(config.host, config.allowed_hosts),
                              max_messages=config.max_messages, drain=self.drain, device=self.device,
                              access_log=config.access_log)
        self.limits = ConnectionLimits(header_timeout_s=config.header_timeout, body_timeout_s=config.body_timeout,
                                       idle_timeout_s=config.idle_timeout, max_connections=config.max_connections)
        self.url: str | None = None
        self.grpc_address: str | None = None
        """host:port of the Triton gRPC listener, once started (`--grpc-port`)."""
        self._grpc: Any = None
        self._uvicorn: _Server | None = None
        self._poller: CatalogPoller | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def load_catalog(self) -> CatalogSnapshot:
        """First read of the catalog; a local manifest must be entirely valid, a registry may be partly."""
        snapshot = await asyncio.to_thread(self.catalog.snapshot)
        if isinstance(self.catalog, ManifestCatalog):
            snapshot.raise_first_error()
        if not snapshot.specs:
            problems = "; ".join(str(e) for e in snapshot.errors) or "the catalog lists no models"
            raise ConfigError(f"no model can be served: {problems}")
        self.runtime.sync_catalog(snapshot)
        refusal = start_refusal(self.runtime) if self.config.strict else None
        if refusal:
            raise ConfigError(refusal)
        if not self.runtime.model_names():
            problems = "; ".join(f"{name}: {why}" for name, why in self.runtime.unservable.items())
            raise ConfigError(f"no model can be served: {problems or 'every catalog entry failed'}")
        return snapshot

    def _start_poller(self, first: CatalogSnapshot, loop: asyncio.AbstractEventLoop) -> CatalogPoller:
        """The poller reads the catalog in its own thread (a registry query can take seconds);
        the runtime is only touched on the event loop."""

        async def apply(snapshot: CatalogSnapshot) -> bool:
            return self.runtime.sync_catalog(snapshot)

        def on_change(snapshot: CatalogSnapshot) -> bool:
            return asyncio.run_coroutine_threadsafe(apply(snapshot), loop).result()

        poller = CatalogPoller(self.catalog, on_change, period_s=self.config.catalog_poll_seconds,
                               removal_grace_s=self.config.catalog_removal_grace_seconds)
        poller.seed(first)
        return poller.start(poll_now=False)

    async def serve(self, ready: Callable[[str], None] | None = None) -> None:
        """Serve until told to stop (a signal in the main thread, or `request_stop`)."""
        self._loop = asyncio.get_running_loop()
        # proto must say TCP: asyncio only turns Nagle's algorithm off on accepted sockets whose
        # proto is IPPROTO_TCP, and with it on, every response on a kept-alive connection
        # waits ~40 ms for a delayed ACK, more than the first token of a hot model.
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        gate = ConnectionGate(self.limits.resolved_max_connections())
        sock = gated_listener(family, gate)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {self.config.host}:{self.config.port}: {exc}") from None
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        warning = exposure_warning(self.config.host, port, self.config.api_key, self.config.admin_key)
        if warning:
            log.warning("%s", warning)
        watcher: asyncio.Task[None] | None = None
        expiry: asyncio.Task[None] | None = None
        lag: asyncio.Task[None] | None = None
        package_log = logging.getLogger("clearml_umem")
        package_log.addHandler(self.model_log)
        try:
            first = await self.load_catalog()
            if self.config.grpc_port is not None:
                await self._start_grpc(host)
            # what start-up built (libraries, the catalog) lives as long as the process: frozen, a
            # full collection no longer walks it, and no full collection stalls requests for long;
            # so is what each move and the first request after it built (`long_lived.py`)
            gc.freeze()
            self.runtime.bus.subscribe(FreezeLongLived())
            log.info("%s", start_banner(self.config, self.budgets, self.runtime, self.url, self.grpc_address))
            if self.config.catalog_poll_seconds > 0:
                self._poller = self._start_poller(first, self._loop)
            quiet_accept_errors(self._loop)
            # uvicorn cancels what still runs this long after the stop: the drain ends it cleanly first
            uv_config = uvicorn.Config(self.app, **UVICORN_LOGGING, lifespan="off",  # type: ignore[arg-type]
                                       http=limited_protocol(self.limits, gate, handoff=handoff_routes(
                                           self.config.max_request_body, self.limits.body_timeout_s)),
                                       timeout_keep_alive=self.limits.idle_timeout_s,
                                       timeout_graceful_shutdown=self.config.shutdown_grace + STOP_MARGIN_S)
            self._uvicorn = _Server(uv_config, on_stop=self._on_stop)
            serving = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
            watcher = asyncio.create_task(self.runtime.watch_engines(), name="umem-engine-watch")
            expiry = asyncio.create_task(self.runtime.expire_idle(), name="umem-keep-alive")
            lag = asyncio.create_task(watch_loop_lag(self.metrics.loop_lag.observe), name="umem-loop-lag")
            while not self._uvicorn.started and not serving.done():
                await asyncio.sleep(0.02)
            if self._uvicorn.started and ready is not None:
                ready(self.url)
            await serving
        finally:
            package_log.removeHandler(self.model_log)
            if watcher is not None:
                watcher.cancel()
            if expiry is not None:
                expiry.cancel()
            if lag is not None:
                lag.cancel()
            if self._grpc is not None:
                await self._grpc.stop(GRPC_GRACE_S)
            if self._poller is not None:
                # joined from a worker thread: a poll in progress waits for this loop to apply it
                await asyncio.to_thread(self._poller.stop)
            await self.app.state.parsers.close()
            await self.app.state.body_readers.close()
            await self.runtime.close()
            sock.close()

    async def _start_grpc(self, host: str) -> None:
        """Imported here: grpc and tritonclient are the optional `[triton]` extra, never loaded without it."""
        try:
            from clearml_umem.router.triton_grpc import start_grpc_server
        except ImportError as exc:
            raise ConfigError(f"--grpc-port needs the triton extra ({exc}): "
                              "pip install 'clearml-unified-memory[triton]'") from None
        assert self.config.grpc_port is not None
        try:
            self._grpc, port = await start_grpc_server(
                self.runtime, self.metrics, self.config.host, self.config.grpc_port, self.config.api_key,
                self.config.admin_key, max_message_bytes=self.config.max_request_body)
        except OSError as exc:
            raise ConfigError(str(exc)) from None
        self.grpc_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _on_stop(self) -> None:
        log.info("stopping: queued requests answered 503, running ones get %g s to finish",
                 self.config.shutdown_grace)
        self.runtime.stop_admitting()
        self.drain.begin(self.config.shutdown_grace)

    def request_stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    @contextmanager
    def run_in_thread(self, timeout: float = 120.0) -> Iterator[str]:
        """Serve from a background thread; yields the base URL, stops and releases engines on exit."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(self.serve(ready=lambda url: ready.set()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                failure.append(exc)
                ready.set()

        thread = threading.Thread(target=target, name="umem-server", daemon=True)
        thread.start()
        if not ready.wait(timeout):
            self.request_stop()
            raise TimeoutError(f"server did not start within {timeout} s")
        if failure:
            raise failure[0]
        try:
            assert self.url is not None
            yield self.url
        finally:
            self.request_stop()
            thread.join(timeout=120)
            if failure:
                raise failure[0]
