"""Prompt bounds learned in the background (`bound_learner.py`), with learners that a test releases:
one model at a time, in the order they joined, a failure costs only its own model, and the thread
is gone once the queue is empty (a runtime that serves no new model holds no thread)."""

from __future__ import annotations

import threading
import time

from clearml_umem.bound_learner import BoundLearner
from clearml_umem.engines.prompt_check import PromptBound
from tests.waiting import wait_until


def test_models_are_learned_one_at_a_time_in_order_and_a_failure_costs_only_its_own() -> None:
    learner = BoundLearner()
    gates = {name: threading.Event() for name in ("a", "b", "c")}
    running: list[str] = []
    most_at_once = 0
    lock = threading.Lock()

    def learn(name: str):
        def run() -> PromptBound | None:
            nonlocal most_at_once
            with lock:
                running.append(name)
                most_at_once = max(most_at_once, len(running))
            try:
                assert gates[name].wait(10)
                if name == "b":
                    raise OSError("no tokenizer files")
            finally:
                with lock:
                    running.remove(name)
            return PromptBound(2048, 16)
        return run

    for name in ("a", "b", "c"):
        learner.add(name, learn(name))
    assert wait_until(lambda: running == ["a"]), "the first model's learning did not start"
    assert not learner.idle()
    time.sleep(0.1)
    assert running == ["a"], "the next model waits for the first"
    for name in ("a", "b", "c"):
        gates[name].set()
    assert wait_until(learner.idle), "the learner did not finish"
    assert learner.learned == ["a", "c"]
    assert most_at_once == 1
    assert wait_until(lambda: not any(t.name == "umem-prompt-bounds" for t in threading.enumerate()))

    learner.add("d", lambda: None)  # a model that joins later starts the thread again
    assert wait_until(learner.idle), "the learner did not finish"
    assert learner.learned == ["a", "c", "d"]
