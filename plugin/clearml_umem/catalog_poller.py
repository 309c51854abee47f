"""Keep a serving process in step with its catalog, without a restart.

Polling (not push) because ClearML has no model-change notifications; the period trades
registry load against how soon a newly registered model becomes servable.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
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

    One read is not trusted to remove a model: a manifest caught while `cat > models.yaml`
    rewrites it shows only its first entries. A model missing from the catalog stays until it
    has been missing on two polls in a row and for `removal_grace_s`; a catalog that lists no
    model at all keeps the current ones with a warning (an empty catalog is refused at start too).
    """

    def __init__(self, catalog: Catalog, on_change: Callable[[CatalogSnapshot], object], *,
                 period_s: float = 30.0, removal_grace_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        if removal_grace_s < 0:
            raise ValueError(f"removal_grace_s must be >= 0, got {removal_grace_s}")
        self.catalog = catalog
        self.on_change = on_change
        self.period_s = period_s
        self.removal_grace_s = removal_grace_s
        self._clock = clock
        self._missing: dict[str, tuple[int, float]] = {}
        """Models of the last applied snapshot missing from the catalog: polls in a row, since when."""
        self._warned_empty = False
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
        if not snapshot.specs and self.last is not None and self.last.specs:
            if not self._warned_empty:
                log.warning("the catalog lists no models; keeping the %d served now (%s)", len(self.last.specs),
                            ", ".join(sorted(s.name for s in self.last.specs)))
                self._warned_empty = True
            return False
        self._warned_empty = False
        snapshot = self._hold_removals(snapshot)
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

    def _hold_removals(self, snapshot: CatalogSnapshot) -> CatalogSnapshot:
        """The snapshot with the models it lacks put back until their removal is confirmed."""
        if self.last is None:
            return snapshot
        now = self._clock()
        present = {s.name for s in snapshot.specs}
        held = []
        missing: dict[str, tuple[int, float]] = {}
        for spec in self.last.specs:
            if spec.name in present:
                continue
            polls, since = self._missing.get(spec.name, (0, now))
            missing[spec.name] = (polls + 1, since)
            if polls + 1 < 2 or now - since < self.removal_grace_s:
                held.append(spec)
                if polls == 0:
                        log.info("model %s is missing from the catalog; kept until its removal is confirmed "
                             "(missing on two polls in a row and for %.0f s)", spec.name, self.removal_grace_s)
        self._missing = {name: seen for name, seen in missing.items() if name in {s.name for s in held}}
        if not held:
            return snapshot
        return dataclasses.replace(snapshot, specs=[*snapshot.specs, *held])

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
