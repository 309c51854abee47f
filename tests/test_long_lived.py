"""What a finished move built is frozen, so that the garbage collector's full collections no longer
walk a loaded model (`long_lived.py`); an unload still collects what the model left in cycles."""

from __future__ import annotations

import gc
import time
import weakref

from clearml_umem.events import EventBus, MoveFinished, RequestRejected
from clearml_umem.long_lived import collect_everything, freeze_after_moves
from clearml_umem.tiers import Tier


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only a collection frees it


def _moved() -> MoveFinished:
    return MoveFinished(model="m", t=time.monotonic(), src=Tier.RAM, dst=Tier.GPU, seconds=0.1, bytes_moved=1)


def test_what_a_move_built_is_frozen_and_an_unload_collects_its_cycles() -> None:
    bus = EventBus()
    bus.subscribe(freeze_after_moves)
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
