"""Holding a model file in host memory, and letting it go: the RAM and disk tiers of llama.cpp.

llama.cpp cannot move a loaded model between the GPU and host memory, so its RAM tier is the
GGUF file kept resident in host memory while no server runs: a restart then maps (CPU) or
uploads (CUDA) pages already in memory instead of reading the disk. This module does the
holding:

- `ResidentFile.hold(path)` maps the file read-only and shared (the page cache pages a
  server's own mmap will find) and locks it with `mlock`, so the kernel cannot drop it under
  memory pressure. Locking needs RLIMIT_MEMLOCK room (8 MiB by default for non-root users)
  or CAP_IPC_LOCK; where it is refused the file stays mapped and every page is read once
  ("mapped and touched"): resident now, reclaimable under pressure. `locked` and
  `lock_problem` say which, for the admin view.
- `drop_from_page_cache(path)` advises the kernel to drop the file's cached pages
  (`posix_fadvise(DONTNEED)`, no root needed); pages mapped or locked elsewhere stay.
- `cached_bytes(path)` counts the file's pages in memory (`mincore`), for tests and the
  benchmark: it is how one checks that a tier holds what it says.

Linux only (the engines run there); elsewhere holding falls back to reading the file once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROT_READ = 0x1
MAP_SHARED = 0x01
MAP_POPULATE = 0x8000
"""Linux: fault the whole mapping in at once (the file is read here, not at first use)."""
MAP_FAILED = ctypes.c_void_p(-1).value

_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        _libc = None

PAGE = mmap.PAGESIZE


@dataclass
class ResidentFile:
    """One file mapped (and locked, where allowed) in this process's memory."""

    path: Path
    size: int
    locked: bool
    lock_problem: str | None
    """Why the file is only mapped and touched, not locked (None when locked)."""
    seconds: float
    """How long holding took: reading the file in, from disk or from the page cache."""
    _addr: int | None = None

    @classmethod
    def hold(cls, path: str | os.PathLike[str], *, lock: bool = True) -> ResidentFile:
        """Map `path` and lock it (or touch every page where locking is refused). Blocks while it reads."""
        path = Path(path)
        started = time.monotonic()
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
            if _libc is None or size == 0:
                _read_through(fd)
                return cls(path, size, False, "no mmap/mlock on this platform: the file was read once",
                           time.monotonic() - started)
            addr = _libc.mmap(None, size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0)
            if addr in (None, MAP_FAILED):
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of {path} failed: {os.strerror(err)}")
        finally:
            os.close(fd)
        problem: str | None = "locking not asked for: mapped and touched"
        if lock:
            if _libc.mlock(addr, size) == 0:
                problem = None
            else:
                err = ctypes.get_errno()
                problem = (f"mlock refused ({errno.errorcode.get(err, err)}: {os.strerror(err)}); RLIMIT_MEMLOCK "
                           f"allows {_memlock_limit()}: mapped and touched instead, so the kernel may drop "
                           f"pages under memory pressure (raise the limit or grant CAP_IPC_LOCK to lock)")
        if problem is not None:
            _touch(addr, size)
        return cls(path, size, problem is None, problem, time.monotonic() - started, addr)

    def release(self) -> None:
        """Unlock and unmap; the pages stay in the page cache until dropped or reclaimed. Idempotent."""
        addr, self._addr = self._addr, None
        if addr is not None and _libc is not None:
            if self.locked:
                _libc.munlock(addr, self.size)
            _libc.munmap(addr, self.size)

    @property
    def held(self) -> bool:
        return self._addr is not None or (_libc is None and self.size >= 0)


def _memlock_limit() -> str:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    except (ImportError, OSError, ValueError):
        return "an unknown amount"
    return "no limit" if soft == resource.RLIM_INFINITY else f"{soft} bytes"


def _touch(addr: int, size: int) -> None:
    """Read one byte of every page: the mapping is resident even without MAP_POPULATE."""
    buf = (ctypes.c_char * size).from_address(addr)
    for offset in range(0, size, PAGE):
        buf[offset]  # noqa: B018 - the read is the point


def _read_through(fd: int) -> None:
    while os.read(fd, 8 * 2**20):
        pass


def drop_from_page_cache(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to drop the file's cached pages (those nobody maps or locks). No root needed."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of the file now in memory (page cache or mapped), from `mincore`; None where unknown."""
    if _libc is None:
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = _libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, MAP_FAILED):
        return None
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, size, vec) != 0:
            return None
        return min(size, sum(v & 1 for v in vec) * PAGE)
    finally:
        _libc.munmap(addr, size)
