"""Which of vLLM's tool-call parsers a model gets, chosen from its architecture.

vLLM 0.32 answers `tool_choice` `required` and a named function with guided decoding of the
calls' JSON, but refuses every tool choice but `none` unless it was started with
`--enable-auto-tool-choice --tool-call-parser NAME` (vllm/renderers/online_renderer.py); for
`auto` the parser is what reads the calls out of the model's text, so it must be the one for
the model family. The parser is picked from config.json's architecture (`TOOL_PARSERS`), or
set per model with the `tool_call_parser` option (a manifest entry's extra field; "none" turns
tools off for the model). Some parsers look up a marker token in the tokenizer when a request
arrives and fail every tools request without it (`MARKER_TOKENS`). A family with no known or
usable parser gets `hermes` (`FALLBACK_PARSER`), which needs no special token: `required` and
named calls work, and `auto` reads Hermes' `<tool_call>` format, which the chat template must
then teach. Without a parser, tools are refused naming the model and engine.
"""

from __future__ import annotations

import json
from pathlib import Path

TOOL_PARSERS: dict[str, str] = {
    "LlamaForCausalLM": "llama3_json",  # Llama 3.1 / 3.2 / 3.3
    "Llama4ForConditionalGeneration": "llama4_pythonic",
    "Qwen2ForCausalLM": "hermes",  # Qwen2.5 writes Hermes' <tool_call> JSON
    "Qwen2MoeForCausalLM": "hermes",
    "Qwen3ForCausalLM": "hermes",
    "Qwen3MoeForCausalLM": "hermes",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mistral",
    "GraniteForCausalLM": "granite",
    "InternLM2ForCausalLM": "internlm",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "GptOssForCausalLM": "openai",
}
"""config.json architecture -> vLLM tool-call parser (vLLM 0.32's names)."""

MARKER_TOKENS: dict[str, str] = {"llama3_json": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}
"""Parsers that need this token in the vocabulary."""

FALLBACK_PARSER = "hermes"


def tool_parser(weights: Path, architecture: str, option: object = None) -> tuple[str | None, str]:
    """(parser or None, why): the option wins; else the architecture's parser if its marker token
    (if any) is in the tokenizer; else the fallback."""
    if option is not None:
        name = str(option).strip()
        return (None, "turned off by the tool_call_parser option") if name.lower() in ("", "none") \
            else (name, "set by the tool_call_parser option")
    parser = TOOL_PARSERS.get(architecture)
    fallback = (f"{FALLBACK_PARSER} as the fallback: required and named tool choices work, auto reads "
                "<tool_call> blocks")
    if parser is None:
        return FALLBACK_PARSER, f"no tool-call parser is known for architecture {architecture or '(unknown)'}; " \
                                + fallback
    marker = MARKER_TOKENS.get(parser)
    if marker is not None and not _has_token(weights, marker):
        return FALLBACK_PARSER, f"its tokenizer has no {marker} token, which vLLM's {parser} parser needs; " + fallback
    return parser, f"{parser} for {architecture}"


def _has_token(weights: Path, token: str) -> bool:
    """Whether tokenizer.json (vocabulary or added tokens) holds `token`; unreadable means no."""
    try:
        data = json.loads((Path(weights) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, dict) and token in vocab:
        return True
    return any(isinstance(t, dict) and t.get("content") == token for t in data.get("added_tokens") or ())
