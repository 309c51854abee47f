"""The router's logging, set up once for the CLI and the ClearML serve task.

The router talks HTTP to its own engines (llama-server and vLLM health checks, sleep and
wake calls). httpx logs every such call at INFO, so a llama.cpp start would flood the log
with `GET http://localhost/health "503 Service Unavailable"` lines that are part of normal
waiting: they are shown only when debugging.
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
INTERNAL_HTTP_LOGGERS = ("httpx", "httpcore")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    quiet_internal_http(level)


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
