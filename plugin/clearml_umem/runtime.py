"""The asyncio shell around the pure scheduler: it owns the engines and carries out moves.

The scheduler decides; this module does. Every scheduler command becomes an engine call
on the event loop (blocking engine work goes to threads inside the engines), and every
outcome goes back into the scheduler, which answers with the next commands. All
scheduler calls happen on the loop's thread, so the scheduler needs no locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from clearml_umem.bound_learner import BoundLearner
from clearml_umem.catalog import CatalogSnapshot
from clearml_umem.commands import Command, Dispatch, Move, PlacementEnded, Reject, Release
from clearml_umem.daemon_workers import CHECKS, run_abandonable
from clearml_umem.engines import (
    Engine,
    EngineContext,
    EngineError,
    EngineOutOfMemory,
    GenerationRequest,
    create_engine,
)
from clearml_umem.engines.progress import describe_progress
from clearml_umem.engines.prompt_check import PromptBound
from clearml_umem.errors import NotFound, ServingError
from clearml_umem.events import EventBus
from clearml_umem.policy import Policy
from clearml_umem.scheduler import ModelState, Scheduler
from clearml_umem.spec import ModelSpec
from clearml_umem.tiers import ALL_TIERS, Footprint, Tier
from clearml_umem.units import fmt_bytes, fmt_seconds

log = logging.getLogger(__name__)


EngineFactory = Callable[[ModelSpec, EngineContext], Engine]


PLACEMENT_TIMEOUT_S = 1800.0
"""Longest a placement waits: a cold start of a large model through vLLM can take minutes."""

PROGRESS_LOG_PERIOD_S = 2.0
"""A move still running logs a progress line this often: a 16 GB load says how far it got
instead of staying silent for minutes; moves shorter than this log nothing extra."""

CLOSE_MOVES_WAIT_S = 30.0
"""How long close() waits for the moves its engine closes made fail: they end within moments (a
process start sees its process gone), so this bounds only an engine that ignores its close."""


class ModelNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"The model '{name}' does not exist; GET /v1/models lists the models served here.")
        self.name = name


class Rejected(ServingError):
    """The scheduler or an engine refused a request or a placement, with the status it means."""

    def __init__(self, status: int, reason: str, code: str = "model_unavailable",
                 retry_after: float | None = None) -> None:
        super().__init__(reason, status=status, code=code)
        self.reason = reason
        self.retry_after = retry_after


def shutting_down() -> Rejected:
    return Rejected(503, "the server is shutting down; retry shortly (another replica, or this one once it is "
                    "back)", code="server_shutting_down", retry_after=2.0)


@dataclass(frozen=True)
class Lease:
    engine: Engine
    served_from: Tier
    arrived: float


@dataclass
class Served:
    """One model the runtime holds an engine for: from `add_model` until its engine is released.

    `in_catalog` goes False when the model leaves the catalog; its engine stays until the
    scheduler's `Release` (requests already queued are served first)."""

    spec: ModelSpec
    engine: Engine
    in_catalog: bool = True
    failure: tuple[float, str] | None = None
    """When and why its last move failed or its engine was lost, for `/admin/models`."""
    under_way: tuple[Move, float] | None = None
    """The move running now and when it started."""
    moves_done: int = 0
    max_concurrency: int | None = None
    """Requests it runs at once: the lower of its engine's limit and the catalog's, None for no limit."""
    stopped: bool = False
    """Its load was stopped at the server's stop, its engine closed then (`stop_admitting`): `close()`
    does not close it again."""


def stopped_by_close(cmd: Move, exc: Exception) -> None:
    """A move that failed because the server is closing its engine: expected, so one line and no traceback."""
    log.info("model %s: move %s -> %s stopped by the shutdown (%s)", cmd.model, cmd.src.value, cmd.dst.value,
             type(exc).__name__)


class Runtime:
    def __init__(
        self,
        device_budget: int,
        host_budget: int,
        engine_context: EngineContext,
        policy: Policy | None = None,
        bus: EventBus | None = None,
        engine_factory: EngineFactory = create_engine,
        clock: Callable[[], float] = time.monotonic,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
        max_waiting: int | None = None,
        fairness: bool = True,
        progress_period_s: float = PROGRESS_LOG_PERIOD_S,
        keep_alive_s: float = math.inf,
        device_kind: str | None = None,
    ) -> None:
        """`keep_alive_s`: seconds a model may stay unused before it moves down a tier, for models
        whose spec gives none (inf: never); `device_kind` ('cuda' or 'cpu') what the top tier runs on."""
        self.bus = bus or EventBus()
        self.engine_context = engine_context
        self._clock = clock
        self._factory = engine_factory
        self.scheduler = Scheduler(device_budget, host_budget, policy=policy, clock=clock, emit=self.bus.emit,
                                   max_waiting=max_waiting, fairness=fairness)
        self._models: dict[str, Served] = {}
        self._waiters: dict[str, asyncio.Future[Dispatch]] = {}
        self._moves: set[asyncio.Task[None]] = set()
        self._landings: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._closed = False
        self._closing = False
        self._placements: dict[str, asyncio.Future[PlacementEnded]] = {}
        self.placement_timeout_s = placement_timeout_s
        self.progress_period_s = progress_period_s
        self.keep_alive_s = keep_alive_s
        self.device_kind = device_kind or ("cpu" if engine_context.device == "cpu" else "cuda")
        self._internal_failure = False
        """True while the scheduler answers an engine's failure: the rejections it makes carry its text."""
        self.unservable: dict[str, str] = {}
        """Catalog models whose engine could not be built, with the reason (retried at the next poll)."""
        self.start_problems: dict[str, str] = {}
        """Served models that can be known at start never to load (no llama-server, over a budget):
        listed, shown in the banner, and their requests refused at once with the reason."""
        self.bounds = BoundLearner()
        """Learns each new model's prompt bound in the background (`bound_learner.py`)."""

    # -- catalog --------------------------------------------------------------------------

    def add_model(self, spec: ModelSpec) -> None:
        """Create the engine object (no loading yet: models start cold) and register its footprints."""
        engine = self._factory(spec, self.engine_context)
        served = getattr(engine, "served_context", None)
        if served and served != spec.context_length:
            # the engine serves less than the model allows (llama.cpp's cap): clients see and are held to that
            spec = dataclasses.replace(spec, context_length=served)
        footprints = {tier: engine.footprint(tier) for tier in ALL_TIERS}
        limits = [n for n in (getattr(engine, "max_concurrency", None), spec.max_concurrency) if n is not None]
        max_in_flight = min(limits) if limits else None
        keep_alive = spec.keep_alive if spec.keep_alive is not None else self.keep_alive_s
        self.scheduler.add_model(spec.name, footprints, engine.tiers, engine.transits,
                                 max_in_flight=max_in_flight, keep_alive=keep_alive)
        self._models[spec.name] = Served(spec, engine, max_concurrency=max_in_flight)
        gpu = footprints[Tier.GPU]
        log.info("model %s: engine %s, tiers %s, needs %s on the device when hot",
                 spec.name, spec.engine, "/".join(t.value for t in ALL_TIERS if t in engine.tiers),
                 fmt_bytes(gpu.device_bytes))
        check = getattr(engine, "start_problem", None)
        problem = (check() if check is not None else None) or self._over_budget(gpu)
        if problem:
            self.start_problems[spec.name] = problem
            log.warning("model %s will not load: %s", spec.name, problem)
        learn = getattr(engine, "learn_prompt_bound", None)
        if learn is not None:
            self.bounds.add(spec.name, learn)

    def _over_budget(self, hot: Footprint) -> str | None:
        """Why a model whose hot footprint exceeds a budget can never be loaded (the scheduler refuses
        it too); said at start so nobody learns it from a first request."""
        if hot.device_bytes > self.scheduler.device_budget:
            return (f"needs {fmt_bytes(hot.device_bytes)} on the device but the device budget is "
                    f"{fmt_bytes(self.scheduler.device_budget)}: it can never be loaded (raise --device-budget, "
                    "or serve a smaller or quantized model)")
        if hot.host_bytes > self.scheduler.host_budget:
            return (f"needs {fmt_bytes(hot.host_bytes)} of host memory but the host budget is "
                    f"{fmt_bytes(self.scheduler.host_budget)}: it can never be loaded (raise --host-budget)")
        return None

    def _refuse_if_unstartable(self, model: str) -> None:
        problem = self.start_problems.get(model)
        if problem:
            raise Rejected(503, f"model {model!r} cannot be loaded: {problem}")

    def remove_model(self, name: str) -> None:
        self._served(name).in_catalog = False
        self.start_problems.pop(name, None)
        self._apply(self.scheduler.remove_model(name))

    def sync_catalog(self, snapshot: CatalogSnapshot) -> bool:
        """Serve exactly the catalog's models: new ones start cold, missing ones drain and go.

        Returns False when some model could not be added yet (still shutting down after
        leaving the catalog, or its engine failed to build), so the caller offers the same
        snapshot again later.
        """
        settled = True
        wanted = {s.name: s for s in snapshot.specs}
        for name in self.model_names():
            if name not in wanted:
                log.info("model %s left the catalog: draining it", name)
                self.remove_model(name)
        for name, spec in wanted.items():
            if self.has_model(name):
                if spec.weights != self._models[name].spec.weights:
                    log.warning("model %s changed weights in the catalog; restart to serve the new weights", name)
                continue
            if name in self._models:
                log.info("model %s is back in the catalog but still shutting down; retried at the next poll", name)
                settled = False
                continue
            log.info("model %s joined the catalog", name)
            try:
                self.add_model(spec)
                self.unservable.pop(name, None)
            except Exception as exc:  # noqa: BLE001 - one bad model must not stop the others
                reason = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
                log.error("model %s cannot be served: %s", name, reason)
                self.unservable[name] = reason
                settled = False
        for error in snapshot.errors:
            log.error("catalog entry skipped: %s", error)
        return settled

    # -- queries --------------------------------------------------------------------------

    def _served(self, name: str) -> Served:
        """The record of a model in the catalog (not one only draining out of it)."""
        served = self._models.get(name)
        if served is None or not served.in_catalog:
            raise ModelNotFound(name)
        return served

    def has_model(self, name: str) -> bool:
        served = self._models.get(name)
        return served is not None and served.in_catalog

    def spec(self, name: str) -> ModelSpec:
        return self._served(name).spec

    def model_names(self) -> list[str]:
        return sorted(name for name, served in self._models.items() if served.in_catalog)

    def engine(self, name: str) -> Engine:
        return self._served(name).engine

    def prompt_bounds(self) -> dict[str, PromptBound]:
        """The byte bound of each model's prompts that its engine knows (`prompt_check.PromptBound`),
        under its name and its aliases, as `resolve_model` reads a request's `model`."""
        names = self.model_names()
        known: dict[str, PromptBound] = {}
        for name in names:
            bound_of = getattr(self._models[name].engine, "prompt_bound", None)
            bound = bound_of() if bound_of is not None else None
            if bound is not None:
                known[name] = bound
        bounds = dict(known)
        for name, bound in known.items():
            for alias in self._models[name].spec.aliases:
                if alias not in names:
                    bounds.setdefault(alias, bound)
        return bounds

    def state(self, name: str) -> ModelState:
        self._served(name)
        return self.scheduler.state(name)

    def admin_view(self) -> list[dict[str, Any]]:
        now_mono, now_wall = self._clock(), time.time()
        rows = []
        for name in self.model_names():
            st = self.scheduler.state(name)
            served = self._models[name]
            spec, engine = served.spec, served.engine
            last_used = None
            if st.uses:
                last_used = datetime.fromtimestamp(now_wall - (now_mono - st.last_used), tz=timezone.utc).isoformat()
            failure = served.failure
            expires_at = None
            if st.expires_at is not None:
                expires_at = datetime.fromtimestamp(now_wall + (st.expires_at - now_mono), tz=timezone.utc).isoformat()
            rows.append({
                "name": name,
                "tier": st.tier.value,
                "moving_to": st.moving_to.value if st.moving_to else None,
                "in_flight": st.in_flight,
                "waiting": st.waiting,
                "size_bytes": spec.size_bytes,
                "device_bytes": st.device_bytes,
                "host_bytes": st.host_bytes,
                "last_used": last_used,
                "uses": st.uses,
                "tiers": [t.value for t in ALL_TIERS if t in st.tiers],
                "engine": spec.engine,
                "architecture": spec.architecture,
                "context_length": spec.context_length,
                "aliases": list(spec.aliases),
                "max_concurrency": served.max_concurrency,
                "engine_details": engine.describe(),
                "last_error": failure[1] if failure else None,
                "moves": served.moves_done,
                "move": self.move_progress(name),
                "keep_alive_s": None if math.isinf(st.keep_alive) else st.keep_alive,
                "expires_at": expires_at,
                "processor": self.processor(name, st),
            })
        return rows

    def processor(self, name: str, st: ModelState) -> str | None:
        """Where the model runs now, named truthfully as `ollama ps` does: `100% GPU` on a GPU,
        `100% CPU` where the top tier is the host's CPU; None below the top tier."""
        if st.tier is not Tier.GPU:
            return None
        device = str((self._models[name].engine.describe() or {}).get("device") or self.device_kind)
        return "100% CPU" if device.startswith("cpu") else "100% GPU"

    def move_progress(self, name: str) -> dict[str, Any] | None:
        """The move of `name` under way: from, to, seconds so far, and its engine's stage and bytes
        when the engine tells them (`progress()`); None when the model is not moving."""
        served = self._models.get(name)
        under_way = served.under_way if served is not None else None
        if served is None or under_way is None:
            return None
        cmd, started = under_way
        row: dict[str, Any] = {"src": cmd.src.value, "dst": cmd.dst.value,
                               "elapsed_s": round(self._clock() - started, 3)}
        progress = getattr(served.engine, "progress", None)
        details = progress() if progress is not None else None
        row.update(details or {"stage": None, "bytes_done": None, "bytes_total": None, "percent": None})
        return row

    def memory(self) -> dict[str, int]:
        return {
            "device_budget": self.scheduler.device_budget,
            "device_used": self.scheduler.device_used,
            "host_budget": self.scheduler.host_budget,
            "host_used": self.scheduler.host_used,
        }

    # -- requests -------------------------------------------------------------------------

    async def check_request(self, model: str, request: GenerationRequest, small: bool = False) -> None:
        """Refuse what the model can never serve (a prompt over its context window) before the
        request waits for it or moves anything. Engines that can tell without being loaded do
        (`check_request`, in a thread of its own that is abandoned when the client leaves). A
        `small` request (its body was parsed on the event loop) is checked there by an engine whose
        check reads no tokenizer (`quick_check`): starting a thread costs more than such a check,
        a millisecond of a hot first token on a busy machine."""
        engine = self._served(model).engine
        check = getattr(engine, "check_request", None)
        self._refuse_if_unstartable(model)
        if check is None:
            return
        if small and getattr(engine, "quick_check", False):
            check(request)
            return
        await run_abandonable(CHECKS, check, request)

    @asynccontextmanager
    async def lease(self, model: str, request_id: str, keep_alive: float | None = None) -> AsyncIterator[Lease]:
        """Wait until `model` is hot and hold it there until the block exits; `keep_alive` (seconds, inf:
        never) is how long it may stay unused afterwards, when the request says."""
        if self._closed:
            raise shutting_down()
        engine = self._served(model).engine
        self._refuse_if_unstartable(model)
        arrived = self._clock()
        fut: asyncio.Future[Dispatch] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = fut
        try:
            self._apply(self.scheduler.on_request(model, request_id, keep_alive=keep_alive))
            try:
                dispatch = await fut
            except (asyncio.CancelledError, Rejected):
                # Rejected here also comes from close(), which the scheduler has not heard of:
                # cancel there too, or a move still ending would load the model for nobody.
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._apply(self.scheduler.on_finished(model, request_id))
                elif model in self.scheduler:
                    self._apply(self.scheduler.on_cancel(model, request_id))
                raise
        finally:
            self._waiters.pop(request_id, None)
        try:
            yield Lease(engine, dispatch.served_from, arrived)
        finally:
            self._apply(self.scheduler.on_finished(model, request_id))

    async def place(self, model: str, tier: Tier) -> ModelState:
        """Move a model to `tier` (when it is idle) and wait until it is there.

        Always answers: done; a 409 when a later placement of the same model to another tier
        overtook this one; a 503 when the move failed or did not end within
        `placement_timeout_s`. A caller that gives up withdraws its placement.
        """
        if self._closed:
            raise Rejected(503, "the server is shutting down")
        self._served(model)
        if tier is not Tier.COLD:
            self._refuse_if_unstartable(model)
        placement_id = uuid.uuid4().hex
        fut: asyncio.Future[PlacementEnded] = asyncio.get_running_loop().create_future()
        self._placements[placement_id] = fut
        try:
            self._apply(self.scheduler.place(model, tier, placement_id))
            try:
                ended = await asyncio.wait_for(asyncio.shield(fut), self.placement_timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                self._withdraw(model, placement_id)
                raise Rejected(503, f"model {model!r} did not reach tier {tier.value!r} within "
                                    f"{self.placement_timeout_s:.0f} s", code="placement_timeout") from None
            except asyncio.CancelledError:
                self._withdraw(model, placement_id)
                raise
        finally:
            self._placements.pop(placement_id, None)
        if ended.outcome == "overtaken":
            raise Rejected(409, ended.reason, code="placement_overtaken")
        if ended.outcome != "done":
            raise Rejected(503, ended.reason, code="placement_failed")
        return self.scheduler.state(model)

    async def check_engines(self) -> list[str]:
        """Ask each engine whether it died on its own (a process: `died()`) or hangs (no progress on
        a request in flight: `hung()`); its state is reset (closed, its requests get an error), the
        scheduler counts the model cold, its memory free, and `/admin/models` shows why. Returns
        the models found dead or hung."""
        lost = []
        for name, served in list(self._models.items()):
            engine = served.engine
            if name not in self.scheduler:
                continue
            st = self.scheduler.state(name)
            if st.tier is Tier.COLD or st.moving_to is not None:
                continue
            died = getattr(engine, "died", None)
            reason = died() if died is not None else None
            if not reason:
                hung = getattr(engine, "hung", None)
                reason = await hung() if hung is not None else None
            if not reason or name not in self.scheduler:
                continue
            st = self.scheduler.state(name)
            if st.tier is Tier.COLD or st.moving_to is not None:
                continue
            log.error("model %s: %s", name, reason)
            served.failure = (self._clock(), reason)
            try:
                await engine.close()
            except Exception:  # noqa: BLE001 - it is dead already; what matters is that it counts as cold
                log.exception("model %s: closing the lost engine failed", name)
            if name in self.scheduler and self.scheduler.state(name).moving_to is None:
                self._apply(self.scheduler.on_engine_lost(name, reason))
                lost.append(name)
        return lost

    async def watch_engines(self, period_s: float = 1.0) -> None:
        """Notice engines that died or hang (the router owns their processes)."""
        while not self._closed:
            await asyncio.sleep(period_s)
            try:
                await self.check_engines()
            except Exception:  # noqa: BLE001 - a failed check must not end the watch for every engine
                log.exception("checking the engines failed; checking again in %.0f s", period_s)

    async def expire_idle(self, period_s: float = 1.0) -> None:
        """The keep-alive timer: the scheduler decides which unused models move down, this only
        lets time pass for it."""
        while not self._closed:
            await asyncio.sleep(period_s)
            self._apply(self.scheduler.on_tick())

    def _withdraw(self, model: str, placement_id: str) -> None:
        if model in self.scheduler:
            self._apply(self.scheduler.withdraw(model, placement_id))

    # -- carrying out commands ------------------------------------------------------------

    def _apply(self, commands: list[Command]) -> None:
        for cmd in commands:
            if isinstance(cmd, Dispatch):
                fut = self._waiters.get(cmd.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(cmd)
                else:
                    self._apply(self.scheduler.on_finished(cmd.model, cmd.request_id))
            elif isinstance(cmd, Reject):
                fut = self._waiters.get(cmd.request_id)
                if fut is not None and not fut.done():
                    if cmd.status == 429:
                        fut.set_exception(Rejected(429, cmd.reason, code="queue_full", retry_after=1.0))
                    else:
                        rejected = Rejected(cmd.status, cmd.reason)
                        rejected.internal = self._internal_failure
                        fut.set_exception(rejected)
            elif isinstance(cmd, Move):
                if self._closing or (self._closed and cmd.dst.hotter_than(cmd.src)):
                    continue  # stopping: nobody is left to use what a load would bring (`_stop_loads`)
                self._start_move(self._run_move(cmd), f"move-{cmd.model}")
            elif isinstance(cmd, PlacementEnded):
                for placement_id in cmd.ids:
                    waiter = self._placements.get(placement_id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(cmd)
            elif isinstance(cmd, Release):
                if self._closing:
                    continue
                released = self._models.pop(cmd.model, None)
                if released is not None:
                    self._start_move(released.engine.close(), f"close-{cmd.model}")

    def _start_move(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` (a move, or an engine's close) as a task `close()` waits for (`_moves`)."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._moves.add(task)
        task.add_done_callback(self._moves.discard)

    async def _log_progress(self, cmd: Move, started: float) -> None:
        """Every `progress_period_s` while the move runs: one line with its stage and bytes."""
        while True:
            await asyncio.sleep(self.progress_period_s)
            row = self.move_progress(cmd.model)
            if row is None:
                return
            log.info("model %s: %s", cmd.model,
                     describe_progress(cmd.src.value, cmd.dst.value, self._clock() - started, row))

    async def _run_move(self, cmd: Move) -> None:
        served = self._models[cmd.model]
        engine = served.engine
        started = self._clock()
        log.info("model %s: %s -> %s%s", cmd.model, cmd.src.value, cmd.dst.value,
                 f": {cmd.reason}" if cmd.reason else "")
        served.under_way = (cmd, started)
        ticker = asyncio.get_running_loop().create_task(self._log_progress(cmd, started),
                                                        name=f"progress-{cmd.model}")
        try:
            result = await engine.move(cmd.src, cmd.dst)
            if result.landing is not None and not (cmd.model in self.scheduler
                                                   and self.scheduler.state(cmd.model).waiting):
                # nobody to serve while the weights arrive (a placement, a keep-alive move): the move
                # ends when they are there, and a copy that failed is its failure
                await asyncio.wrap_future(result.landing)
                result = dataclasses.replace(result, landing=None)
        except Exception as exc:  # noqa: BLE001 - any engine failure becomes a clean 503, not a dead server
            if self._closing or served.stopped:
                return stopped_by_close(cmd, exc)
            if isinstance(exc, EngineOutOfMemory):
                self._out_of_memory(cmd, served, exc)
            else:
                await self._move_failed(cmd, served, exc)
        else:
            seconds = self._clock() - started
            served.moves_done += 1
            log.info("model %s: %s -> %s in %s (%s)", cmd.model, cmd.src.value, cmd.dst.value, fmt_seconds(seconds),
                     fmt_bytes(result.bytes_moved))
            landing = result.landing
            self._apply(self.scheduler.on_move_done(cmd.model, cmd.src, cmd.dst, seconds, result.bytes_moved,
                                                       footprints=result.footprints, host_copy=result.host_copy,
                                                       landing=landing is not None))
            if landing is not None:
                task = asyncio.get_running_loop().create_task(
                    self._report_landing(cmd, started, result.bytes_moved, landing), name=f"landing-{cmd.model}")
                self._landings.add(task)
                task.add_done_callback(self._landings.discard)
        finally:
            ticker.cancel()
            served.under_way = None
        async with self._changed:
            self._changed.notify_all()

    def _out_of_memory(self, cmd: Move, served: Served, exc: EngineOutOfMemory) -> None:
        """The model stays where it was: out of device memory is a refusal of this move, not a fault."""
        log.warning("model %s: out of device memory moving %s -> %s: %s", cmd.model, cmd.src.value,
                    cmd.dst.value, exc)
        served.failure = (self._clock(), str(exc))
        self._apply(self.scheduler.on_move_failed(cmd.model, cmd.src, cmd.dst, str(exc), now_in=cmd.src,
                                                     out_of_memory=True))

    async def _move_failed(self, cmd: Move, served: Served, exc: Exception) -> None:
        """Any other failure: the engine is closed and the model counts as cold."""
        if isinstance(exc, EngineError):  # an engine's own refusal says what went wrong: no traceback
            log.error("model %s: move %s -> %s failed: %s", cmd.model, cmd.src.value, cmd.dst.value, exc)
        else:
            log.error("model %s: move %s -> %s failed", cmd.model, cmd.src.value, cmd.dst.value, exc_info=exc)
        served.failure = (self._clock(), f"{type(exc).__name__}: {exc}")
        try:
            await served.engine.close()
        except Exception:  # noqa: BLE001
            log.exception("model %s: closing the engine after a failed move also failed", cmd.model)
        # its text can hold paths: the requests it fails answer with a reference to the log
        # (router/errors.py), while the admin view and placements keep it
        self._internal_failure = True
        try:
            self._apply(self.scheduler.on_move_failed(cmd.model, cmd.src, cmd.dst, str(exc), now_in=Tier.COLD))
        finally:
            self._internal_failure = False

    async def _report_landing(self, cmd: Move, started: float, bytes_moved: int,
                              landing: concurrent.futures.Future[float]) -> None:
        """A pipelined swap-in served before its weights all arrived: its time is reported once they did.
        A copy that failed is not reported here: the requests that ran on it and the model's next
        move fail with that error, and the engine is then closed."""
        try:
            await asyncio.wrap_future(landing)
        except Exception as exc:  # noqa: BLE001 - any failure: the weights on the device are not the model's
            # the requests running on it fail with that error; the model goes cold and reloads for the next
            log.error("model %s: the copy of its weights to the device failed: %s", cmd.model, exc)
            served = self._models.get(cmd.model)
            if served is None:
                return
            served.failure = (self._clock(), f"{type(exc).__name__}: {exc}")
            try:
                await served.engine.close()
            except Exception:  # noqa: BLE001
                log.exception("model %s: closing the engine after a failed copy also failed", cmd.model)
            if cmd.model in self.scheduler and self.scheduler.state(cmd.model).moving_to is None:
                self._apply(self.scheduler.on_engine_lost(cmd.model, f"the copy of its weights failed: {exc}"))
            return
        seconds = self._clock() - started
        log.info("model %s: weights on the device %s after the swap-in began (%s)", cmd.model,
                 fmt_seconds(seconds), fmt_bytes(bytes_moved))
        if cmd.model in self._models:
            self._apply(self.scheduler.on_move_landed(cmd.model, cmd.src, seconds, bytes_moved))

    def stop_admitting(self) -> None:
        """The server is stopping: every queued request is answered now (503, Retry-After) instead
        of waiting for a model it would not get, and new ones are refused the same way; requests
        already running keep their models."""
        self._closed = True
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(shutting_down())
        self._stop_loads()

    def _stop_loads(self) -> None:
        """A load under way for a model no running request holds served only the requests just
        refused: its engine is closed now (its move then ends as at `close()`), so that it does not
        compete with the streams finishing their grace for the link, the cores or a vLLM start's
        device memory. Evictions run on: they free memory and end soon."""
        for name, served in self._models.items():
            if served.under_way is None or served.stopped:
                continue
            cmd = served.under_way[0]
            if not cmd.dst.hotter_than(cmd.src) or (name in self.scheduler and self.scheduler.state(name).in_flight):
                continue
            served.stopped = True
            self._start_move(self._close_engine(name, served), f"stop-{name}")

    async def close(self) -> None:
        """Refuse new work, then release every engine (processes included) at once, without waiting
        for the moves under way: nobody is left to use what they bring, and a vLLM start can take
        minutes, past a Kubernetes grace period. An engine's close makes its move fail (a process
        start is stopped, a read from disk stops at its next piece); those moves are then waited for,
        and no move starts after this point."""
        self.stop_admitting()
        self._closing = True
        for waiter in self._placements.values():
            if not waiter.done():
                waiter.set_result(PlacementEnded("", (), "failed", "the server is shutting down"))
        served = [(name, one) for name, one in self._models.items() if not one.stopped]
        await asyncio.gather(*(self._close_engine(name, one) for name, one in served))
        if self._moves:
            await asyncio.wait(list(self._moves), timeout=CLOSE_MOVES_WAIT_S)
        self._models.clear()

    @staticmethod
    async def _close_engine(name: str, served: Served) -> None:
        try:
            await served.engine.close()
        except Exception:  # noqa: BLE001 - keep closing the others
            log.exception("model %s: engine close failed", name)
