"""Engine logs through the real process launcher: owner-only, and bounded however much an engine writes."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from clearml_umem.engines.process import launch
from tests.waiting import wait_until

CHATTY = ("import sys\n"
          "line = b'x' * 99 + b'\\n'\n"
          "for i in range(30000):\n"
          "    sys.stdout.buffer.write(line)\n"
          "sys.stdout.buffer.write(b'the last line\\n')\n")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_engine_log_is_owner_only_and_rotated(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    folder.mkdir(mode=0o755)
    log = folder / "engine.log"
    log.write_bytes(b"an older run\n")
    os.chmod(folder, 0o755)
    os.chmod(log, 0o644)  # as earlier versions left them: readable by every user of the machine
    limit = 1 << 20
    proc = launch([sys.executable, "-c", CHATTY], log_path=log, watchdog=False, log_max_bytes=limit)
    assert wait_until(lambda: not proc.alive(), 60)
    assert "the last line" in proc.log_tail(3)  # nothing the engine said last is lost to the pipe
    proc.stop()
    rotated = folder / "engine.log.1"
    assert rotated.exists(), "3 MB written with a 1 MB limit: the log must have been rotated"
    assert log.stat().st_size <= limit and rotated.stat().st_size <= limit
    assert sorted(p.name for p in folder.iterdir()) == ["engine.log", "engine.log.1"]  # one older copy, no more
    assert _mode(folder) == 0o700
    assert _mode(log) == 0o600 and _mode(rotated) == 0o600
