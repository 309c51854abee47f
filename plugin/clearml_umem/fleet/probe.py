"""The front's view of the routers: who is up, which models each serves, in which tier, how loaded.

Each router says it at `GET /status`; this module asks every router there every `probe_s` seconds
(and once more right after a router answered a request, when its tiers have just changed), asks
the discovery again for the list of routers, and remembers what it sent since each router's last
answer, so a burst of requests for a cold model goes to the router now loading it rather than
loading it everywhere. A router that does not answer (or refuses a connection) is shown gone at
once; it is back with its next good answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx

from clearml_umem.fleet.choose import ModelLoad, RouterView

log = logging.getLogger(__name__)

DEFAULT_PROBE_S = 2.0
"""Seconds between status probes: a dead router is shown gone within about this (env UMEM_FLEET_PROBE_SECONDS)."""

Discover = Callable[[], list[str]]
"""Router base URLs now (blocking: run in a worker thread; a ClearML query is HTTP)."""


def parse_status(url: str, answer: Any) -> RouterView:
    if not isinstance(answer, dict) or not isinstance(answer.get("models"), list):
        return RouterView(url, alive=False, error="its /status answer is not a clearml-umem router's")
    models = {}
    for row in answer["models"]:
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            models[row["id"]] = ModelLoad(tier=str(row.get("tier") or "cold"), in_flight=int(row.get("in_flight") or 0),
                                          waiting=int(row.get("waiting") or 0), moving_to=row.get("moving_to"))
    return RouterView(url, alive=True, models=models, device=str(answer.get("device") or ""))


class Fleet:
    """One per event loop: it owns tasks and an httpx client of that loop."""

    def __init__(self, discover: Discover, client: httpx.AsyncClient, probe_s: float = DEFAULT_PROBE_S,
                 probe_timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> None:
        self._discover = discover
        self._client = client
        self.probe_s = probe_s
        self.probe_timeout_s = probe_timeout_s
        self._headers = headers or {}
        self._views: dict[str, RouterView] = {}
        self._probes_started: dict[str, int] = {}
        self._probes_seen: dict[str, int] = {}
        self._sent: dict[tuple[str, str], int] = {}
        self._open: dict[str, int] = {}
        self._kicked: dict[str, asyncio.Task[None]] = {}
        self._refreshed_at: float | None = None
        self._lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self.discovery_error: str | None = None

    # -- the view ------------------------------------------------------------------------

    def views(self) -> list[RouterView]:
        """Each router as last seen, with what was sent to it since: those models count as on
        their way to the GPU there, and its load is at least what this front has open on it."""
        out = []
        for url, view in sorted(self._views.items()):
            models = dict(view.models)
            for (sent_url, model), mark in self._sent.items():
                if sent_url == url and model in models and self._probes_seen.get(url, 0) <= mark:
                    models[model] = replace(models[model], moving_to="gpu")
            out.append(replace(view, models=models, pending=self._open.get(url, 0)))
        return out

    async def ready(self) -> None:
        """Probe now if the view is older than `probe_s` (the first request waits for the first probe)."""
        if self._refreshed_at is None or time.monotonic() - self._refreshed_at > self.probe_s:
            await self.refresh()

    async def refresh(self) -> None:
        async with self._lock:
            try:
                urls = [u.rstrip("/") for u in await asyncio.to_thread(self._discover)]
                self.discovery_error = None
            except Exception as exc:  # noqa: BLE001 - keep routing with the routers already known
                self.discovery_error = f"{type(exc).__name__}: {exc}"
                log.warning("fleet discovery failed, keeping the routers known: %s", self.discovery_error)
                urls = list(self._views)
            for gone in set(self._views) - set(urls):
                self._views.pop(gone, None)
            await asyncio.gather(*(self._probe(url) for url in dict.fromkeys(urls)))
            self._refreshed_at = time.monotonic()

    async def _probe(self, url: str) -> None:
        number = self._probes_started[url] = self._probes_started.get(url, 0) + 1
        try:
            resp = await self._client.get(url + "/status", headers=self._headers, timeout=self.probe_timeout_s)
            view = (parse_status(url, resp.json()) if resp.status_code == 200 else
                    RouterView(url, alive=False, error=f"/status answered HTTP {resp.status_code}"
                                                     + (" (wrong or missing API key: UMEM_API_KEY)"
                                                        if resp.status_code in (401, 403) else "")))
        except (httpx.HTTPError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            view = RouterView(url, alive=False, error=why)
        self._views[url] = view
        self._probes_seen[url] = max(self._probes_seen.get(url, 0), number)
        self._sent = {key: mark for key, mark in self._sent.items() if self._probes_seen.get(key[0], 0) <= mark}

    def kick(self, url: str) -> None:
        """Probe one router soon (its tiers just changed): one probe at a time per router."""
        running = self._kicked.get(url)
        if running is None or running.done():
            self._kicked[url] = asyncio.get_running_loop().create_task(self._probe(url))

    def mark_down(self, url: str, why: str) -> None:
        old = self._views.get(url)
        if old is not None:
            self._views[url] = RouterView(url, alive=False, device=old.device, error=why)

    # -- what this front sends -----------------------------------------------------------

    def sent(self, url: str, model: str) -> None:
        self._sent[(url, model)] = self._probes_started.get(url, 0)
        self._open[url] = self._open.get(url, 0) + 1

    def finished(self, url: str) -> None:
        self._open[url] = max(0, self._open.get(url, 0) - 1)

    # -- the probe loop ------------------------------------------------------------------

    def start(self) -> None:
        """Probe every `probe_s` seconds in the background, until `close`."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="umem-fleet-probe")

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the loop outlives one bad round
                log.warning("fleet probe round failed", exc_info=True)
            await asyncio.sleep(self.probe_s)

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._kicked.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        """The fleet as JSON: every router with its device, models, tiers and load."""
        routers = []
        for view in self.views():
            routers.append({"url": view.url, "alive": view.alive, "device": view.device, "error": view.error,
                            "load": view.load, "models": [
                                {"id": name, "tier": m.tier, "moving_to": m.moving_to, "in_flight": m.in_flight,
                                 "waiting": m.waiting} for name, m in sorted(view.models.items())]})
        return {"object": "fleet.status", "routers": routers, "probe_s": self.probe_s,
                "discovery_error": self.discovery_error}
