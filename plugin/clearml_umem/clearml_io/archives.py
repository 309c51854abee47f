"""Extracting weight archives that come from a registry: untrusted input that must not escape.

ClearML's own extraction checks member paths as text, so a tar whose symlinks climb
(`L0 -> .`, `L1 -> L0/..`, then a file under `L1/...`) writes outside its folder. Here an
archive may hold only regular files and directories, each with a relative path that stays
inside the destination; anything else (links, devices, absolute or `..` paths) refuses the
whole archive, and so does one that would unpack to far more than its own size (a bomb).
Extraction goes to a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

MAX_EXPANSION = 20
"""Unpacked bytes may be at most this many times the archive's size (weights barely compress)."""
MIN_ALLOWANCE = 2**30


class UnsafeArchive(ValueError):
    """The archive cannot be extracted safely; the message names the member and why."""


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract `archive` (.zip, .tar, .tar.gz, .tgz...) into `dest` (created; must not exist yet)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    allowance = max(MIN_ALLOWANCE, MAX_EXPANSION * archive.stat().st_size)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, allowance)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp, allowance)
        else:
            raise UnsafeArchive(f"{archive.name} is neither a zip nor a tar archive")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _safe_relative(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts):
        raise UnsafeArchive(f"member {name!r} climbs out of the archive with '..'")
    return path


def _inside(root: Path, relative: PurePosixPath) -> Path:
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise UnsafeArchive(f"member {str(relative)!r} would be written outside the destination")
    return target


def _check_members(root: Path, members: list[tuple[str, int]], allowance: int) -> None:
    """Before anything is written: every member lands inside `root`, and all of them together
    unpack to no more than `allowance` bytes (a bomb is refused before it costs disk)."""
    total = 0
    for name, size in members:
        _inside(root, _safe_relative(name))
        total += size
        if total > allowance:
            raise UnsafeArchive(f"unpacks to more than {allowance} bytes, {MAX_EXPANSION}x the archive")


def _extract_tar(archive: Path, root: Path, allowance: int) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            if not (m.isfile() or m.isdir()):
                kind = "a symlink" if m.issym() else "a hard link" if m.islnk() else "a special file"
                raise UnsafeArchive(f"member {m.name!r} is {kind}; weight archives may hold only files and folders")
        _check_members(root, [(m.name, m.size) for m in members], allowance)
        for m in members:
            target = _inside(root, _safe_relative(m.name))
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(m)
            if source is None:
                raise UnsafeArchive(f"member {m.name!r} cannot be read")
            with source, open(target, "xb") as out:
                shutil.copyfileobj(source, out, 16 * 2**20)


def _extract_zip(archive: Path, root: Path, allowance: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchive(f"member {info.filename!r} is a symlink; weight archives may hold only files")
        _check_members(root, [(info.filename, info.file_size) for info in infos], allowance)
        for info in infos:
            target = _inside(root, _safe_relative(info.filename))
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with zf.open(info) as source, open(target, "xb") as out:
                while chunk := source.read(16 * 2**20):
                    written += len(chunk)
                    if written > info.file_size:
                        raise UnsafeArchive(f"member {info.filename!r} unpacks to more than it declares")
                    out.write(chunk)
