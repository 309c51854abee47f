"""Keeping the garbage collector's full collections short in a process that holds models.

A full (generation 2) collection walks every object the collector tracks, and a loaded model's
modules, parameters, tokenizers and batching state are hundreds of thousands of them: in a router
serving the tiny demo model on 2 cores, full collections held the GIL for 50-100 ms each (measured
with `gc.callbacks`), a stall for every client's stream, and one that big request bodies (whose
parsing allocates a lot) made more frequent. What start-up built is frozen for the same reason
(`server.py`). So whatever a finished move built is frozen too, and so is what a model's first
request after it built (its tokenizer for prompt checks, its batching manager and the modules those
import on first use: 40,000-100,000 objects, sympy's and torch._dynamo's among them, which full
collections of 15-57 ms walked when they were left out): the collector leaves frozen objects alone,
and reference counting still frees them when a model lets them go. Only those two moments freeze:
anything later may be garbage in cycles, which frozen would stay until the next unload.

An unloaded model may leave objects in reference cycles, which only a collection frees: an engine
that unloads asks for `collect_everything`, which unfreezes first, and the move's end freezes what
is left again.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from clearml_umem.events import Event, MoveFinished, RequestFinished


@dataclass
class FreezeLongLived:
    """A bus listener: after each finished move, and after the first request each model finished
    since its last move, what the process holds is long-lived."""

    _warming: set[str] = field(default_factory=set)
    """Models moved whose first request has not finished yet."""

    def __call__(self, event: Event) -> None:
        if isinstance(event, MoveFinished):
            self._warming.add(event.model)
            gc.freeze()
        elif isinstance(event, RequestFinished) and event.model in self._warming:
            self._warming.discard(event.model)
            gc.freeze()


def collect_everything() -> None:
    """A full collection that reaches frozen objects too (what an unloaded model left in cycles)."""
    gc.unfreeze()
    gc.collect()
