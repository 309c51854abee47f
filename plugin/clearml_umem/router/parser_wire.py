"""What the router and its parser processes say to each other over a pipe and a Unix socket
(`parser_pool.py`, `clearml_umem.parser_child`): a body goes one way, its outcome comes back."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Literal

from clearml_umem.engines.prompt_check import PromptBound

BodyKind = Literal["chat", "completion", "object", "triton"]
"""What a body is for: a chat or completion request (validated as one); a Triton generate or infer
request's (checked for its shape, its JSON `text_input` against the one bound sent with it: its
path's model's); or any other JSON object (checked for its shape only)."""

KINDS: tuple[BodyKind, ...] = ("chat", "completion", "object", "triton")

HEADER = struct.Struct("!IBBII")
"""Before each body: its length in bytes, its kind (an index into `KINDS`), how it comes (`PIPED`,
`SHARED`), the messages cap, and the length of the prompt bounds that follow it (`encode_bounds`)."""

PIPED, SHARED = 0, 1
"""How a body comes: its bytes after the bounds, on the pipe; or a memory file's descriptor on the
parser process's socket (`body_handoff.SharedBody`), sent with one byte, whose first `length`
bytes are the body."""

ANSWER = struct.Struct("!BI")
"""Before each answer: the outcome, the payload's length in bytes."""

PREPARED, REFUSED, FAILED = 0, 1, 2
"""Outcomes: the pickled `schemas.PreparedBody`; the client's error as JSON (`status`, `message`,
`param`, `code`); the parser process's own fault, as text."""


def encode_bounds(bounds: Mapping[str, PromptBound]) -> bytes:
    """The models' prompt bounds as sent with each body: a few bytes a model, and always the
    router's latest (a model's bound is known once its first tokenizer loaded)."""
    return json.dumps({name: [b.context_length, b.bytes_per_token] for name, b in bounds.items()}).encode()


def decode_bounds(raw: bytes) -> dict[str, PromptBound]:
    return {name: PromptBound(int(ctx), int(per_token)) for name, (ctx, per_token) in json.loads(raw).items()}
