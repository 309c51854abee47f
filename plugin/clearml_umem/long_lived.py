"""Keeping the garbage collector's full collections short in a process that holds models.

A full (generation 2) collection walks every object the collector tracks, and a loaded model's
modules, parameters, tokenizers and batching state are hundreds of thousands of them: in a router
serving the tiny demo model on 2 cores, full collections held the GIL for 50-100 ms each
(measured with `gc.callbacks`), a stall for every client's stream, and one that big request
bodies (whose parsing allocates a lot) made more frequent. What start-up built is frozen for the
same reason (`server.py`). So whatever a finished move built is frozen too: the collector leaves
frozen objects alone, and reference counting still frees them when a model lets them go.

An unloaded model may leave objects in reference cycles, which only a collection frees: an
engine that unloads asks for `collect_everything`, which unfreezes first, and the move's end
freezes what is left again.
"""

from __future__ import annotations

import gc

from clearml_umem.events import Event, MoveFinished


def freeze_after_moves(event: Event) -> None:
    """A bus listener: after each finished move, what the process holds now is long-lived."""
    if isinstance(event, MoveFinished):
        gc.freeze()


def collect_everything() -> None:
    """A full collection that reaches frozen objects too (what an unloaded model left in cycles)."""
    gc.unfreeze()
    gc.collect()
