"""What the router and its parser processes say to each other over a pipe (`parser_pool.py`,
`clearml_umem.parser_child`): a body goes one way, its outcome comes back."""

from __future__ import annotations

import struct
from typing import Literal

BodyKind = Literal["chat", "completion", "object"]
"""What a body is for: a chat or completion request (validated as one), or any other JSON object
(a Triton request's, checked for its shape only)."""

KINDS: tuple[BodyKind, ...] = ("chat", "completion", "object")

HEADER = struct.Struct("!IBI")
"""Before each body: its length in bytes, its kind (an index into `KINDS`), the messages cap."""

ANSWER = struct.Struct("!BI")
"""Before each answer: the outcome, the payload's length in bytes."""

PREPARED, REFUSED, FAILED = 0, 1, 2
"""Outcomes: the pickled `schemas.PreparedBody`; the client's error as JSON (`status`, `message`,
`param`, `code`); the parser process's own fault, as text."""
