"""How much KV cache and context a vLLM engine gets, from the model and the device budget alone.

Several vLLM engines share one GPU, and vLLM's default (take 90% of the free memory) would
let the first engine starve the others. Each engine therefore gets an explicit
`--kv-cache-memory-bytes` and `--max-model-len`, chosen here so that the user configures
nothing. Pure arithmetic on the model's config: unit-testable without vLLM or a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GiB = 1024**3
MiB = 1024**2

BLOCK_TOKENS = 16
"""vLLM's default KV block size: context lengths are rounded down to whole blocks."""

DEFAULT_CONTEXT = 2048
"""Context assumed when a config names none (old GPT-2 style configs)."""

MIN_MODEL_LEN = 256
"""Below this a chat model cannot hold a system prompt and an answer: refuse rather than serve it."""

TARGET_SEQUENCES = 4
"""Full-context sequences the KV cache should hold at once when the budget allows it."""

KV_BUDGET_FRACTION = 0.25
"""Most of the device budget one model's KV cache may take, so that other models still fit beside it."""

DEFAULT_HOST_KV_BYTES = 1 * GiB
"""KV cache cap when no device budget is known (CPU serving): small, host RAM is shared by every engine."""

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "float8": 1, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1,
}


class KVSizingError(ValueError):
    """The model cannot get a usable context inside the device budget."""


@dataclass(frozen=True)
class KVShape:
    """What the KV cache's size per token depends on."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_context: int

    @property
    def bytes_per_token(self) -> int:
        """Keys and values, every layer, every KV head."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class KVPlan:
    """The sizes an engine is started with, and why, for the log and the admin view."""

    kv_cache_bytes: int
    max_model_len: int
    bytes_per_token: int
    reason: str

    @property
    def kv_tokens(self) -> int:
        return self.kv_cache_bytes // self.bytes_per_token

    def as_dict(self) -> dict[str, Any]:
        return {"kv_cache_bytes": self.kv_cache_bytes, "max_model_len": self.max_model_len,
                "kv_bytes_per_token": self.bytes_per_token, "kv_tokens": self.kv_tokens,
                "kv_sizing": self.reason}


def dtype_bytes(dtype: str | None, default: int = 2) -> int:
    """Bytes per element; 'auto' and unknown names get `default` (16-bit is what serving uses)."""
    if not dtype:
        return default
    return _DTYPE_BYTES.get(str(dtype).lower().removeprefix("torch."), default)


def shape_from_config(cfg: Mapping[str, Any], *, dtype: str = "auto",
                      context_length: int | None = None) -> KVShape:
    """Read layers, KV heads and head size from a Hugging Face config.

    Multimodal configs keep the language model under `text_config`; grouped-query models
    name their KV heads `num_key_value_heads`, older ones have as many as attention heads.
    A spec dtype other than 'auto' wins over the config's, as vLLM's `--dtype` does.
    """
    text = cfg.get("text_config")
    if isinstance(text, Mapping):
        cfg = {**cfg, **text}
    layers = _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first_int(cfg, "num_attention_heads", "n_head")
    if not layers or not heads:
        raise KVSizingError("config names no layer or attention-head count; cannot size the KV cache")
    kv_heads = _first_int(cfg, "num_key_value_heads", "num_kv_heads", "multi_query_group_num") or heads
    head_dim = _first_int(cfg, "head_dim")
    if not head_dim:
        hidden = _first_int(cfg, "hidden_size", "n_embd", "d_model")
        if not hidden:
            raise KVSizingError("config names neither head_dim nor hidden_size; cannot size the KV cache")
        head_dim = hidden // heads
    config_dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    element = dtype_bytes(dtype if dtype and dtype != "auto" else config_dtype)
    context = context_length or _first_int(cfg, "max_position_embeddings", "n_positions", "max_sequence_length",
                                           "seq_length") or DEFAULT_CONTEXT
    return KVShape(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=element,
                   max_context=context)


def plan_kv_cache(shape: KVShape, *, weights_bytes: int, overhead_bytes: int, device_budget_bytes: int | None,
                  max_model_len_cap: int | None = None, target_sequences: int = TARGET_SEQUENCES,
                  budget_fraction: float = KV_BUDGET_FRACTION) -> KVPlan:
    """Pick KV cache bytes and context length.

    The KV cache aims at `target_sequences` full-context sequences, capped at
    `budget_fraction` of the device budget and at what is left beside the weights and the
    process overhead. When that cap cannot hold one full-context sequence, the context is
    cut to what fits (whole blocks, at least MIN_MODEL_LEN) rather than failing: vLLM
    refuses to start when the KV cache cannot hold one sequence of `--max-model-len`.
    """
    per_token = shape.bytes_per_token
    context = min(shape.max_context, max_model_len_cap) if max_model_len_cap else shape.max_context
    context = max(BLOCK_TOKENS, context // BLOCK_TOKENS * BLOCK_TOKENS)
    wanted = per_token * context * max(1, target_sequences)
    min_len = min(context, MIN_MODEL_LEN)
    floor = per_token * min_len
    if device_budget_bytes is None:
        free = None
        cap = DEFAULT_HOST_KV_BYTES
        where = "no device budget"
    else:
        free = device_budget_bytes - weights_bytes - overhead_bytes
        if free < floor:
            raise KVSizingError(
                f"device budget {device_budget_bytes / GiB:.2f} GiB leaves {max(free, 0) / GiB:.2f} GiB beside "
                f"{weights_bytes / GiB:.2f} GiB of weights and {overhead_bytes / GiB:.2f} GiB of process overhead; "
                f"{min_len} tokens of KV cache need {floor / GiB:.3f} GiB")
        cap = min(free, int(device_budget_bytes * budget_fraction))
        where = f"{budget_fraction:.0%} of the {device_budget_bytes / GiB:.2f} GiB device budget"
    kv = min(wanted, cap)
    if kv < floor:
        kv = floor if free is None else min(free, floor)
    kv = _round_up(kv, MiB)
    if free is not None and kv > free:
        kv = free
    fits = kv // per_token
    max_model_len = min(context, fits // BLOCK_TOKENS * BLOCK_TOKENS)
    if kv >= wanted:
        reason = f"{target_sequences} sequences of {context} tokens ({per_token} B/token)"
    else:
        reason = (f"capped at {where}: {fits} tokens ({per_token} B/token), "
                  f"context {max_model_len} of {shape.max_context}")
    return KVPlan(kv_cache_bytes=int(kv), max_model_len=int(max_model_len), bytes_per_token=per_token,
                  reason=reason)


def _first_int(cfg: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
