"""Tiny random-weight GGUF models (Llama architecture), written locally with the `gguf` package.

No machine here reaches a model hub, so tests, the demo and the llama.cpp benchmark make
their own GGUF files: a real llama.cpp Llama (attention, SwiGLU, RMS norm, RoPE) with random
weights, a SentencePiece-style vocabulary with byte fallback (every text encodes) and a chat
template, in f16 or q8_0. Written in well under a second for the tiny shapes; the benchmark
asks for a bigger shape so that moving the weights dominates process start.

The output rows of control and byte tokens are zero: their logits are 0 while some word's
logit is almost surely positive, so greedy answers are printable words, never an early end
of text (the same reason `tinymodels.prefer_printable_output` exists).
"""

from __future__ import annotations

import os
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUILD_VERSION = "1"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("the", "tier", "model", "swap", "memory", "host", "device", "cache", "token", "layer", "fast", "slow",
         "disk", "ram", "gpu", "cold", "hot", "warm", "load", "serve", "router", "file", "block", "page", "once",
         "upon", "time", "tell", "me", "about", "and", "of", "to", "in", "is", "it", "a", "an", "on", "for")
CONTROL = ("<unk>", "<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
QUANTIZATIONS = ("f16", "q8_0")


@dataclass(frozen=True)
class TinyGGUF:
    """Shape of one tiny GGUF model. Dimensions are multiples of 32 (q8_0 blocks)."""

    name: str
    quantization: str = "f16"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    context_length: int = 2048
    seed: int = 0


DEMO_GGUF: tuple[TinyGGUF, ...] = (
    TinyGGUF("tiny-gguf-f16", "f16", hidden_size=128, num_layers=4, intermediate_size=256, seed=11),
    TinyGGUF("tiny-gguf-q8", "q8_0", hidden_size=128, num_layers=4, intermediate_size=256, seed=12),
)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: control tokens, the 256 byte tokens, letters and words (SentencePiece style)."""
    tokens: list[str] = []
    types: list[int] = []
    for i, tok in enumerate(CONTROL):
        tokens.append(tok)
        types.append(2 if i == 0 else 3)  # UNKNOWN, CONTROL
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)  # BYTE
    pieces = ["\u2581"] + list(string.ascii_lowercase) + [f"\u2581{c}" for c in string.ascii_lowercase]
    pieces += list(string.digits) + [".", ",", "?", "!"] + [f"\u2581{w}" for w in WORDS]
    seen = set(tokens)
    for p in pieces:
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(1)  # NORMAL
    # SentencePiece picks the highest-scoring segmentation: longer pieces score higher
    scores = [0.0 if t != 1 else float(len(tok)) - 10.0 for tok, t in zip(tokens, types, strict=True)]
    return tokens, scores, types


def write_tiny_gguf(path: Path, model: TinyGGUF) -> Path:
    """Write `model` to `path` (atomically: a reader never sees half a file)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
    from gguf.quants import quantize

    if model.quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {model.quantization!r}")
    tokens, scores, types = vocabulary()
    n_vocab, d, ff = len(tokens), model.hidden_size, model.intermediate_size
    head_dim = d // model.num_heads
    kv = head_dim * model.num_kv_heads
    rng = np.random.default_rng(model.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = GGUFWriter(tmp, "llama")
        w.add_name(model.name)
        w.add_context_length(model.context_length)
        w.add_embedding_length(d)
        w.add_block_count(model.num_layers)
        w.add_feed_forward_length(ff)
        w.add_head_count(model.num_heads)
        w.add_head_count_kv(model.num_kv_heads)
        w.add_rope_dimension_count(head_dim)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(n_vocab)
        ftype = LlamaFileType.MOSTLY_F16 if model.quantization == "f16" else LlamaFileType.MOSTLY_Q8_0
        w.add_file_type(int(ftype))
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types([TokenType(t) for t in types])
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(3)  # <|end|>, which closes each chat turn
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)

        qtype = GGMLQuantizationType.F16 if model.quantization == "f16" else GGMLQuantizationType.Q8_0

        def matrix(name: str, rows: int, cols: int, scale: float | None = None) -> None:
            data = rng.standard_normal((rows, cols), dtype=np.float32) * (scale or cols ** -0.5)
            if name == "output.weight":
                data[[i for i, t in enumerate(types) if t != 1]] = 0.0
            if qtype == GGMLQuantizationType.F16:
                w.add_tensor(name, data.astype(np.float16))
            else:
                w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

        def norm(name: str) -> None:
            w.add_tensor(name, np.ones(d, dtype=np.float32))

        matrix("token_embd.weight", n_vocab, d, scale=1.0)
        for i in range(model.num_layers):
            norm(f"blk.{i}.attn_norm.weight")
            matrix(f"blk.{i}.attn_q.weight", d, d)
            matrix(f"blk.{i}.attn_k.weight", kv, d)
            matrix(f"blk.{i}.attn_v.weight", kv, d)
            matrix(f"blk.{i}.attn_output.weight", d, d)
            norm(f"blk.{i}.ffn_norm.weight")
            matrix(f"blk.{i}.ffn_gate.weight", ff, d)
            matrix(f"blk.{i}.ffn_up.weight", ff, d)
            matrix(f"blk.{i}.ffn_down.weight", d, ff)
        norm("output_norm.weight")
        matrix("output.weight", n_vocab, d, scale=4.0 / d ** 0.5)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_tiny_gguf(root: Path, models: tuple[TinyGGUF, ...] = DEMO_GGUF,
                     progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Each model as `root/<name>-v<BUILD_VERSION>.gguf`, written once and reused."""
    out: dict[str, Path] = {}
    for m in models:
        path = Path(root) / f"{m.name}-v{BUILD_VERSION}.gguf"
        if not path.is_file():
            if progress:
                progress(f"writing tiny GGUF {m.name} ({m.quantization}) to {path}")
            write_tiny_gguf(path, m)
        out[m.name] = path
    return out
