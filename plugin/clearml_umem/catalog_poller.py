"""Keep a serving process in step with its catalog, without a restart.

Polling (not push) because ClearML has no model-change notifications; the period trades
registry load against how soon a newly registered model becomes servable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from clearml_umem.catalog import Catalog, CatalogSnapshot

log = logging.getLogger(__name__)


def _fingerprint(snapshot: CatalogSnapshot) -> tuple[object, ...]:
    return (tuple(sorted(snapshot.specs, key=lambda s: s.name)), tuple(sorted(str(e) for e in snapshot.errors)))


class CatalogPoller:
    """Re-reads `catalog` every `period_s` and calls `on_change(snapshot)` when it differs.

    A catalog that fails as a whole (registry unreachable) is logged and skipped: the
    last good snapshot keeps serving, since unloading every model because a server
    blinked would turn a registry outage into a serving outage.

    A callback that returns False could not apply the snapshot in full (a model still
    shutting down, an engine that failed to build): the same snapshot is offered again at
    the next poll instead of being taken as applied.
    """

    def __init__(self, catalog: Catalog, on_change: Callable[[CatalogSnapshot], object], *,
                 period_s: float = 30.0) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.catalog = catalog
        self.on_change = on_change
        self.period_s = period_s
        self.last: CatalogSnapshot | None = None
        self.failures = 0
        self._last_fp: tuple[object, ...] | None = None
        self._pending_fp: tuple[object, ...] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        """Read the catalog now; True when the callback was called with a changed snapshot."""
        try:
            snapshot = self.catalog.snapshot()
        except Exception as exc:  # noqa: BLE001 - any catalog failure keeps the last snapshot
            self.failures += 1
            log.warning("catalog refresh failed, keeping the last %s: %s",
                        "snapshot" if self.last is not None else "state (none yet)", exc)
            return False
        fp = _fingerprint(snapshot)
        if fp == self._last_fp:
            return False
        added = {s.name for s in snapshot.specs} - {s.name for s in (self.last.specs if self.last else [])}
        removed = {s.name for s in (self.last.specs if self.last else [])} - {s.name for s in snapshot.specs}
        if fp != self._pending_fp:
            log.info("catalog changed: %d models (%s added, %s removed), %d errors", len(snapshot.specs),
                     ", ".join(sorted(added)) or "none", ", ".join(sorted(removed)) or "none",
                     len(snapshot.errors))
        settled = self.on_change(snapshot)
        self.last = snapshot
        self._pending_fp = fp
        self._last_fp = None if settled is False else fp
        return True

    def seed(self, snapshot: CatalogSnapshot) -> None:
        """Take a snapshot the caller already applied as the baseline, so the first poll reports
        only what changed since."""
        self.last = snapshot
        self._last_fp = self._pending_fp = _fingerprint(snapshot)

    def start(self, *, poll_now: bool = True) -> CatalogPoller:
        if poll_now:
            self.poll_once()
        self._thread = threading.Thread(target=self._run, name="umem-catalog-poller", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - a failing callback must not end polling
                log.exception("catalog change callback failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.period_s + 5)
            self._thread = None

    def __enter__(self) -> CatalogPoller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
