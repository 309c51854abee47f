"""The router's logging, set up once for the CLI and the ClearML serve task.

Records are written by a thread of their own (`LogWriter`), never by the thread that logs: a
write to stderr blocks while whatever reads it (a pipe to a supervisor, a container runtime, a
terminal scrolled back) is slow, and the event loop then stopped with it. Measured with the
benchmark's reader as the slow one, each access-log line held the loop 0.6 ms, a third of what
the router added to a first token. The queue between them is bounded: if the reader stalls for
long, new records are dropped and counted, and the count is logged once the writer moves again.

The router talks HTTP to its own engines (llama-server and vLLM health checks, sleep and
wake calls). httpx logs every such call at INFO, so a llama.cpp start would flood the log
with `GET http://localhost/health "503 Service Unavailable"` lines that are part of normal
waiting: they are shown only when debugging.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
from logging.handlers import QueueHandler

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
INTERNAL_HTTP_LOGGERS = ("httpx", "httpcore")


LOG_QUEUE_RECORDS = 10_000
"""Records waiting for the writer thread, at most; the next ones are dropped and counted."""

WRITER_STOP_S = 2.0
"""At exit, how long the records still queued may take to be written."""


def setup_logging(level: str) -> None:
    """Records to stderr through `LogWriter`; a root logger that has handlers already (set up by
    whoever embeds the router, or by an earlier call) is left as it is."""
    if logging.root.handlers:
        logging.basicConfig(level=level.upper())
    else:
        writer = LogWriter(logging.StreamHandler(sys.stderr))
        writer.sink.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.basicConfig(level=level.upper(), handlers=[writer.handler])
        writer.start()
        atexit.register(writer.stop)
    quiet_internal_http(level)


class _Enqueue(QueueHandler):
    """Never blocks: a full queue drops the record and counts it."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self.setFormatter(logging.Formatter("%(message)s"))  # the message (and traceback); the sink adds the rest
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class LogWriter:
    """A thread that writes the records `handler` queues to `sink`."""

    def __init__(self, sink: logging.Handler, capacity: int = LOG_QUEUE_RECORDS) -> None:
        self.sink = sink
        self.capacity = capacity
        self._records: queue.Queue[logging.LogRecord | None] = queue.Queue(capacity)
        self.handler = _Enqueue(self._records)
        self._told = 0
        self._thread = threading.Thread(target=self._run, name="umem-log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = WRITER_STOP_S) -> None:
        """Write what is queued, for at most `timeout_s` (a sink that stays stalled is given up on)."""
        if not self._thread.is_alive():
            return
        try:
            self._records.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (record := self._records.get()) is not None:
            dropped = self.handler.dropped
            if dropped != self._told:
                self.sink.handle(logging.makeLogRecord({
                    "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": f"{dropped - self._told} log records were dropped: whatever reads this log was too "
                           f"slow to keep {self.capacity} queued"}))
                self._told = dropped
            self.sink.handle(record)


UVICORN_LOGGING: dict[str, object] = {"log_config": None, "log_level": "warning", "access_log": False}
"""What `uvicorn.Config` gets for logging. Its default `log_config` runs `logging.config.dictConfig`,
which closes every handler of the process while it holds logging's lock: ClearML's TaskHandler
among them, whose close joins its sender thread, which waits for that lock to log an HTTP call.
A serve task then hung after its start banner (and, when it did not, had stopped sending its log
to ClearML). With `log_config=None` uvicorn only sets its loggers' levels; its lines go to ours."""


def quiet_internal_http(level: str) -> None:
    """Internal HTTP calls at WARNING unless the level is debug."""
    internal = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in INTERNAL_HTTP_LOGGERS:
        logging.getLogger(name).setLevel(internal)
