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


def quiet_internal_http(level: str) -> None:
    """Internal HTTP calls at WARNING unless the level is debug."""
    internal = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in INTERNAL_HTTP_LOGGERS:
        logging.getLogger(name).setLevel(internal)
