"""Tiny random-weight models of real architectures, built locally.

No machine here reaches a model hub, so the demo and the tests make their own models:
real Hugging Face configs (Llama, Qwen2, Mistral) with random weights, saved as
safetensors next to a byte-level tokenizer and a chat template. Any engine that loads a
Hugging Face directory (transformers, vLLM) loads these unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

BUILD_VERSION = "2"
SPECIAL_TOKENS = ("<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModel:
    """Shape of one tiny model; small enough to build and run on two CPU cores in seconds."""

    name: str
    model_type: str
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    dtype: str = "bfloat16"
    seed: int = 0


DEMO_MODELS: tuple[TinyModel, ...] = (
    TinyModel("tiny-llama", "llama", hidden_size=256, num_layers=4, seed=1),
    TinyModel("tiny-qwen2", "qwen2", hidden_size=256, num_layers=6, seed=2),
    TinyModel("tiny-mistral", "mistral", hidden_size=384, num_layers=4, intermediate_size=768, seed=3),
)


def build_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer with no merges: every text encodes, every id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)


def build_tiny_model(out_dir: str | Path, shape: TinyModel) -> Path:
    """Build one model directory atomically: a half-written directory is never left behind."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        build_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        vocab_size = len(tokenizer)
        config = AutoConfig.for_model(
            shape.model_type,
            vocab_size=vocab_size,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_kv_heads,
            max_position_embeddings=shape.max_position_embeddings,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            tie_word_embeddings=False,
        )
        torch.manual_seed(shape.seed)
        model = AutoModelForCausalLM.from_config(config)
        prefer_printable_output(model, tokenizer)
        model = model.to(getattr(torch, shape.dtype))
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
        )
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "umem_tiny.json").write_text(json.dumps({"build_version": BUILD_VERSION, **asdict(shape)}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def prefer_printable_output(model: object, tokenizer: object) -> None:
    """Zero the output rows of tokens that are not printable ASCII (ids beyond the tokenizer included).

    Random weights otherwise pick stray UTF-8 bytes and the demo prints replacement
    characters; with those rows at zero, greedy decoding stays on readable text while the
    network itself is untouched. One masked write, so a 128k-row head on a GPU costs one kernel.
    """
    import torch

    head = model.get_output_embeddings().weight  # type: ignore[attr-defined]
    keep = torch.zeros(head.shape[0], dtype=torch.bool)
    for token_id in range(min(len(tokenizer), head.shape[0])):  # type: ignore[arg-type]
        text = tokenizer.decode([token_id])  # type: ignore[attr-defined]
        keep[token_id] = len(text) == 1 and (text.isalnum() and text.isascii() or text in " .,!?'-")
    with torch.no_grad():
        head[~keep.to(head.device)] = 0


def _is_built(path: Path, shape: TinyModel) -> bool:
    marker = path / "umem_tiny.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == {"build_version": BUILD_VERSION, **asdict(shape)}
    except (OSError, json.JSONDecodeError):
        return False


def ensure_tiny_models(root: str | Path, shapes: tuple[TinyModel, ...] = DEMO_MODELS,
                       progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Build the models under `root` once; later calls reuse them."""
    root = Path(root)
    paths: dict[str, Path] = {}
    for shape in shapes:
        path = root / shape.name
        if not _is_built(path, shape):
            if progress:
                progress(f"building {shape.name} ({shape.model_type}, hidden {shape.hidden_size}, "
                         f"{shape.num_layers} layers) in {path}")
            build_tiny_model(path, shape)
        elif progress:
            progress(f"reusing {shape.name} in {path}")
        paths[shape.name] = path
    return paths
