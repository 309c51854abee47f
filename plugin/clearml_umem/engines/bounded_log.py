"""An engine's log file: readable by its owner only, and bounded in size.

Engine output (prompts in llama-server's verbose lines, paths, tracebacks) is for the operator:
the file is created 0600 in a 0700 folder. An engine runs for days and logs per request, so its
output is not handed to it as a file to append to forever: it goes through a pipe that a thread
of the router copies into the file, moving the file to `<name>.1` (the one older copy kept)
whenever it reaches `max_bytes`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import IO

DEFAULT_MAX_BYTES = 20 * 2**20
"""Per engine log; with the one older copy, at most twice this on disk per model."""

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def private_folder(folder: Path) -> None:
    """Create `folder` (owner-only), or make an existing one owner-only."""
    folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    with contextlib.suppress(PermissionError):
        os.chmod(folder, FOLDER_MODE)


def open_private(path: Path) -> IO[bytes]:
    """`path` for appending, created 0600 (and made 0600 if it existed with wider modes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "ab")


class BoundedLog:
    """Appends to `path`, rotating to `path.1` past `max_bytes`. One writer thread at a time."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        private_folder(path.parent)
        self._file = open_private(path)
        self._size = self._file.tell()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._file.closed:
                return
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._file.write(data)
            self._file.flush()
            self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = open_private(self.path)
        self._size = 0

    def copy_from(self, stream: IO[bytes]) -> threading.Thread:
        """Copy `stream` (an engine's stdout) into the log until it ends, in a daemon thread."""

        def pump() -> None:
            with contextlib.suppress(OSError, ValueError):
                while chunk := stream.read1(64 * 1024):  # type: ignore[attr-defined]
                    self.write(chunk)
            with contextlib.suppress(OSError):
                stream.close()
            self.close()

        thread = threading.Thread(target=pump, name=f"log-{self.path.name}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed
