"""Each model's prompt bound, learned at start in the background rather than at its first request.

The router's parser processes refuse a multi-megabyte prompt that cannot fit its model from its
byte length (`engines/prompt_check.PromptBound`), but a model's bound is only known once a
tokenizer of it was loaded, which used to wait for the model's first request: until then such
bodies were prepared in full and unpickled by the router, only to be refused by the engine. So
the runtime hands each engine that can learn its bound (`learn_prompt_bound`) to one thread,
which loads them one after another: a tokenizer each model's checks would load anyway, and one
at a time so that a catalog of many models does not load them all at once at start.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from clearml_umem.engines.prompt_check import PromptBound

log = logging.getLogger(__name__)


class BoundLearner:
    """A queue of models whose bound is to be learned, and the daemon thread that works through it
    (started when there is work, gone when there is none)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[tuple[str, Callable[[], PromptBound | None]]] = deque()
        self._thread: threading.Thread | None = None
        self.learned: list[str] = []
        """Models whose `learn` returned, in order (for tests and the log)."""

    def add(self, model: str, learn: Callable[[], PromptBound | None]) -> None:
        with self._lock:
            self._pending.append((model, learn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="umem-prompt-bounds", daemon=True)
                self._thread.start()

    def idle(self) -> bool:
        with self._lock:
            return self._thread is None

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
                model, learn = self._pending.popleft()
            try:
                bound = learn()
            except Exception as exc:  # noqa: BLE001 - the bound stays unknown; the engine still checks
                log.debug("model %s: its prompt bound was not learned: %s", model, exc)
                continue
            with self._lock:
                self.learned.append(model)
            if bound is not None:
                log.info("model %s: prompt bound learned: a prompt over %d bytes a token of its %d-token context "
                         "is refused where its body is parsed", model, bound.bytes_per_token, bound.context_length)
