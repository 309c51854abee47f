"""What a finished move built, and what its model's first request built after it, is frozen, so that
the garbage collector's full collections no longer walk a loaded model (`long_lived.py`); an unload
still collects what the model left in cycles, and later requests' leftovers are never frozen."""

from __future__ import annotations

import gc
import time
import weakref

from clearml_umem.events import EventBus, MoveFinished, RequestFinished, RequestRejected
from clearml_umem.long_lived import FreezeLongLived, collect_everything
from clearml_umem.tiers import Tier


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only a collection frees it


def _moved(model: str = "m") -> MoveFinished:
    return MoveFinished(model=model, t=time.monotonic(), src=Tier.RAM, dst=Tier.GPU, seconds=0.1, bytes_moved=1)


def _finished(model: str = "m") -> RequestFinished:
    return RequestFinished(model=model, t=time.monotonic(), request_id="r", served_from=Tier.GPU, ok=True,
                           completion_tokens=1, duration_s=0.1)


def test_what_a_move_built_is_frozen_and_an_unload_collects_its_cycles() -> None:
    bus = EventBus()
    bus.subscribe(FreezeLongLived())
    try:
        gc.collect()
        before = gc.get_freeze_count()
        built = [[i] for i in range(10_000)]  # a model's many small objects
        bus.emit(RequestRejected(model="m", t=time.monotonic(), request_id="r", reason="x"))
        assert gc.get_freeze_count() == before, "only a finished move freezes"
        bus.emit(_moved())
        assert gc.get_freeze_count() >= before + len(built)

        node = _Node()
        left = weakref.ref(node)
        bus.emit(_moved())
        del node  # the model let it go, in a cycle
        gc.collect()
        assert left() is not None, "frozen: a full collection leaves it alone"
        collect_everything()
        assert left() is None, "an unload's collection reaches frozen objects"
    finally:
        gc.unfreeze()


def test_a_models_first_request_after_a_move_freezes_what_it_built_and_later_ones_do_not() -> None:
    """A model's tokenizer for prompt checks and its batching manager are made by its first request
    (they were 100,000 objects that full collections walked while big bodies arrived); what a later
    request leaves in cycles must stay collectable, as must another model's first request's."""
    bus = EventBus()
    bus.subscribe(FreezeLongLived())
    try:
        bus.emit(_moved("m"))
        gc.collect()
        before = gc.get_freeze_count()
        first_built = [[i] for i in range(10_000)]
        bus.emit(_finished("other"))
        assert gc.get_freeze_count() == before, "a model not moved since: nothing to freeze for it"
        bus.emit(_finished("m"))
        assert gc.get_freeze_count() >= before + len(first_built)

        node = _Node()
        left = weakref.ref(node)
        bus.emit(_finished("m"))  # a later request: not a moment to freeze
        del node
        gc.collect()
        assert left() is None, "a later request's cycle is still collected"

        bus.emit(_moved("m"))  # moved again: its next first request freezes once more
        again = gc.get_freeze_count()
        rebuilt = [[i] for i in range(10_000)]
        bus.emit(_finished("m"))
        assert gc.get_freeze_count() >= again + len(rebuilt)
    finally:
        gc.unfreeze()
