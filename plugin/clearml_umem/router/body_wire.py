"""What the router and its body reader process (`body_reader_child.py`) say to each other: a job
(its tag, the body's length, the bytes already in its memory file, the body timeout) with the
client's socket and the memory file as descriptors, and the job's outcome."""

from __future__ import annotations

import struct

JOB = struct.Struct("<QQQd")
"""tag, length, bytes already in the file, seconds the sender may send nothing."""

REPLY = struct.Struct("<QB")
"""tag, outcome."""

DONE, GONE, STALLED, FAILED = 0, 1, 2, 3
"""The body is in its file; the client left (or the router gave up); it stopped sending; a fault."""
