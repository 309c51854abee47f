"""`log_setup.LogWriter`: the thread that logs never waits for the log's reader. A sink the test
gates stands for a stderr pipe whose reader stalled."""

from __future__ import annotations

import logging
import threading
import time

from clearml_umem.log_setup import LogWriter


class GatedSink(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.open.wait()
        self.lines.append(record.getMessage())


def _logger(writer: LogWriter, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(writer.handler)
    return logger


def test_a_stalled_reader_never_blocks_the_logging_thread_and_drops_are_told() -> None:
    sink = GatedSink()
    writer = LogWriter(sink, capacity=3)
    writer.start()
    logger = _logger(writer, "umem-test-stalled")
    started = time.monotonic()
    for i in range(50):
        logger.info("line %d", i)
    logged_in = time.monotonic() - started
    sink.open.set()
    writer.stop(timeout_s=10)
    assert logged_in < 5  # 50 calls against a sink that never returned while they ran
    kept = [line for line in sink.lines if line.startswith("line ")]
    told = [line for line in sink.lines if "dropped" in line]
    assert 3 <= len(kept) <= 4 and kept[0] == "line 0"  # the one being written, then the queue's
    assert told == [f"{50 - len(kept)} log records were dropped: whatever reads this log was too slow to keep 3 "
                    "queued"]


def test_stop_writes_what_is_queued_and_gives_up_on_a_sink_that_stays_stalled() -> None:
    sink = GatedSink()
    sink.open.set()
    writer = LogWriter(sink)
    writer.start()
    logger = _logger(writer, "umem-test-stop")
    for i in range(100):
        logger.info("line %d", i)
    writer.stop()
    assert sink.lines == [f"line {i}" for i in range(100)]

    stalled = GatedSink()
    writer = LogWriter(stalled, capacity=1)
    writer.start()
    logger = _logger(writer, "umem-test-stop-stalled")
    for i in range(5):
        logger.info("line %d", i)
    started = time.monotonic()
    writer.stop(timeout_s=0.5)
    assert time.monotonic() - started < 5
    stalled.open.set()
