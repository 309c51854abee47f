"""KV cache and context sizing from a model's config and the device budget."""

from __future__ import annotations

import pytest

from clearml_umem.engines.kv_sizing import (
    BLOCK_TOKENS,
    DEFAULT_HOST_KV_BYTES,
    MIN_MODEL_LEN,
    GiB,
    KVShape,
    KVSizingError,
    dtype_bytes,
    plan_kv_cache,
    shape_from_config,
)

LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
            "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}


def test_shape_of_a_gqa_llama() -> None:
    shape = shape_from_config(LLAMA_8B)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.dtype_bytes) == (32, 8, 128, 2)
    assert shape.bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert shape.max_context == 131072


def test_shape_fallbacks_and_overrides() -> None:
    gpt2 = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}
    shape = shape_from_config(gpt2, dtype="float32")
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.dtype_bytes) == (12, 12, 64, 4)
    assert shape.max_context == 1024
    explicit = shape_from_config({**LLAMA_8B, "head_dim": 256}, context_length=4096)
    assert explicit.head_dim == 256 and explicit.max_context == 4096
    nested = shape_from_config({"architectures": ["X"], "text_config": LLAMA_8B})
    assert nested.bytes_per_token == 131072
    assert dtype_bytes("torch.float16") == 2 and dtype_bytes("auto") == 2 and dtype_bytes("fp8") == 1


def test_shape_needs_layers_and_heads() -> None:
    with pytest.raises(KVSizingError):
        shape_from_config({"hidden_size": 64})


def test_plan_aims_at_full_context_sequences_when_budget_allows() -> None:
    shape = KVShape(num_layers=4, num_kv_heads=2, head_dim=64, dtype_bytes=2, max_context=2048)
    plan = plan_kv_cache(shape, weights_bytes=10 * 2**20, overhead_bytes=GiB, device_budget_bytes=8 * GiB)
    assert plan.max_model_len == 2048
    assert plan.kv_cache_bytes >= 4 * 2048 * shape.bytes_per_token
    assert plan.kv_cache_bytes % 2**20 == 0
    assert plan.as_dict()["kv_tokens"] == plan.kv_tokens >= 4 * 2048


def test_plan_caps_kv_at_a_share_of_the_budget_and_shortens_context() -> None:
    shape = shape_from_config(LLAMA_8B)
    plan = plan_kv_cache(shape, weights_bytes=16 * GiB, overhead_bytes=GiB, device_budget_bytes=24 * GiB)
    assert plan.kv_cache_bytes <= int(24 * GiB * 0.25) + 2**20
    assert plan.max_model_len < 131072
    assert plan.max_model_len % BLOCK_TOKENS == 0
    assert plan.max_model_len * shape.bytes_per_token <= plan.kv_cache_bytes
    assert "capped" in plan.reason


def test_plan_uses_what_is_left_when_the_share_is_too_small_for_a_minimum_context() -> None:
    shape = shape_from_config(LLAMA_8B)
    budget = 16 * GiB + GiB + MIN_MODEL_LEN * shape.bytes_per_token + 2**20
    plan = plan_kv_cache(shape, weights_bytes=16 * GiB, overhead_bytes=GiB, device_budget_bytes=budget,
                         budget_fraction=0.0001)
    assert plan.max_model_len >= MIN_MODEL_LEN
    assert 16 * GiB + GiB + plan.kv_cache_bytes <= budget


def test_plan_refuses_a_model_that_cannot_fit() -> None:
    shape = shape_from_config(LLAMA_8B)
    with pytest.raises(KVSizingError, match="device budget"):
        plan_kv_cache(shape, weights_bytes=16 * GiB, overhead_bytes=GiB, device_budget_bytes=17 * GiB)


def test_plan_without_a_budget_and_with_a_length_cap() -> None:
    shape = shape_from_config(LLAMA_8B)
    plan = plan_kv_cache(shape, weights_bytes=16 * GiB, overhead_bytes=GiB, device_budget_bytes=None)
    assert plan.kv_cache_bytes == DEFAULT_HOST_KV_BYTES
    assert plan.max_model_len == DEFAULT_HOST_KV_BYTES // shape.bytes_per_token
    capped = plan_kv_cache(shape, weights_bytes=1, overhead_bytes=0, device_budget_bytes=80 * GiB,
                           max_model_len_cap=1000)
    assert capped.max_model_len == 992
