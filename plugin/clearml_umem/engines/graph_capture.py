"""The batched steps of every model on one device, against the capture of a CUDA graph by any of them.

A CUDA graph that samples records draws from the device's default random generator, and torch
marks that generator as capturing for the whole capture, in every thread: a draw made outside a
capture meanwhile fails ("Offset increment outside graph capture encountered unexpectedly"), and
so does a second capture. transformers' continuous batching captures lazily, on the first step of
each padded shape (after a warm-up step run eagerly, which draws too), so with several models hot
on one GPU one model's capture killed another's sampled step, and with it every request that
model's batch held: three of the four models of the first GPU proof with batching lost their
batches that way within seconds (2026-12-04, H200, transformers 5.25).

So on each device a capture runs alone: it waits for the batched steps under way to end (they take
milliseconds), and steps that would begin meanwhile wait for it (a capture takes 0.1-1.3 s, once
per shape and copy of the weights). A capture that cannot begin within `wait_s` (a step of another
model is stuck) is not made: its step runs eagerly, as transformers does without graphs, and the
next step of that shape tries again. Requests on the engine's per-request path never draw from
the default generator (their sampling has a generator of its own), so they need no turn here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

CAPTURE_WAIT_S = 5.0
"""Longest a capture waits for other models' steps to end before its step runs without a graph."""

_this_thread = threading.local()
"""`gate`: the gate whose step this thread is running, if any (a capture is found inside a step,
where only the thread knows which device's gate it is under)."""


def gate_of_this_step() -> CaptureGate | None:
    """The gate of the step this thread is in (`CaptureGate.step`), or None outside any."""
    return getattr(_this_thread, "gate", None)


class CaptureGate:
    """Steps share a device; a capture has it alone. Pure threading, no torch: tested without a GPU."""

    def __init__(self, wait_s: float = CAPTURE_WAIT_S) -> None:
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._steps = 0
        self._capturing = False
        self._waiting = 0
        self.captures = 0
        """Captures made alone (for tests and the log)."""
        self.skipped = 0
        """Captures given up after `wait_s`: their step ran eagerly."""

    @contextmanager
    def step(self) -> Iterator[None]:
        """Around one batched step of one model (which may capture inside, through `capture`); the
    thread's gate meanwhile (`gate_of_this_step`)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing and not self._waiting)
            self._steps += 1
        outer, _this_thread.gate = gate_of_this_step(), self
        try:
            yield
        finally:
            _this_thread.gate = outer
            with self._cond:
                self._steps -= 1
                self._cond.notify_all()

    @contextmanager
    def capture(self) -> Iterator[bool]:
        """Around one capture (its warm-up included): yields True when this thread has the device alone,
        False when `wait_s` passed first (then capture nothing: no other step is excluded)."""
        held = 1 if gate_of_this_step() is self else 0
        with self._cond:
            self._steps -= held  # this thread's own step must not keep its capture waiting
            self._waiting += 1
            self._cond.notify_all()
            alone = self._cond.wait_for(lambda: not self._capturing and self._steps == 0, timeout=self.wait_s)
            self._waiting -= 1
            if alone:
                self._capturing = True
                self.captures += 1
            else:
                self.skipped += 1
                self._cond.wait_for(lambda: not self._capturing)  # another capture: a draw now would fail
                self._steps += held
                self._cond.notify_all()
        try:
            yield alone
        finally:
            if alone:
                with self._cond:
                    self._capturing = False
                    self._steps += held
                    self._cond.notify_all()


_gates: dict[str, CaptureGate] = {}
_gates_lock = threading.Lock()


def gate_for(device: str) -> CaptureGate:
    """The one gate of `device` (e.g. "cuda:0") in this process."""
    with _gates_lock:
        gate = _gates.get(device)
        if gate is None:
            gate = _gates[device] = CaptureGate()
        return gate
