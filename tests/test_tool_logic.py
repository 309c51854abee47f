"""The pure parts of function calling, structured output, logprobs and penalties: OpenAI's
semantics on small tensors and strings, each engine's translation, no work for plain requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clearml_umem.engines.base import Delta, GenerationRequest, InvalidRequest
from clearml_umem.engines.constrained import constrained_schema, grammar
from clearml_umem.engines.llamacpp_api import adapt_body, check_options
from clearml_umem.engines.logits import BiasProcessor, PenaltyProcessor
from clearml_umem.engines.openai_stream import SSEDecoder
from clearml_umem.engines.tool_calls import CallShaper, parse_calls, plain_conversation
from clearml_umem.engines.vllm_tools import tool_parser
from clearml_umem.router.answer import ToolCallJoin, completion_logprobs
from clearml_umem.router.schemas import ChatRequest, to_generation_request, validate
from clearml_umem.spec import ModelSpec

TOOLS = [{"type": "function", "function": {"name": "a", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
         {"type": "function", "function": {"name": "b"}}]


def test_penalties_follow_openai_formula_over_generated_tokens_only() -> None:
    scores = torch.zeros(1, 5)
    ids = torch.tensor([[3, 3, 1, 1, 1, 2]])  # prompt [3, 3]; generated 1, 1, 1, 2
    out = PenaltyProcessor(frequency=0.5, presence=0.25, prompt_length=2)(ids, scores.clone())
    assert out.tolist() == [[0.0, -(3 * 0.5 + 0.25), -(0.5 + 0.25), 0.0, 0.0]]
    negative = PenaltyProcessor(frequency=-1.0, presence=0.0, prompt_length=2)(ids, scores.clone())
    assert negative[0, 1] == 3.0, "a negative penalty encourages repeats"


def test_logit_bias_adds_to_the_named_tokens() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    out = BiasProcessor({"0": 100.0, "2": -100.0}, 3, torch.device("cpu"))(torch.tensor([[1]]), scores)
    assert out.tolist() == [[101.0, 2.0, -97.0]]


def _feed(shaper: CallShaper, text: str, step: int) -> tuple[ToolCallJoin, list[Delta]]:
    join, deltas = ToolCallJoin(), []
    for i in range(0, len(text), step):
        for d in shaper.feed(text[i:i + step]):
            deltas.append(d)
            join.add(d.tool_calls or [])
    return join, deltas


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_required_calls_stream_header_once_then_arguments(step: int) -> None:
    text = '[{"name":"a","arguments":{"x":"}\\"{","y":[{}]}},{"name":"b","arguments":{}}]'
    shaper = CallShaper({"tools": TOOLS, "tool_choice": "required"})
    join, deltas = _feed(shaper, text, step)
    calls = join.calls()
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": '}"{', "y": [{}]}
    assert calls[1]["function"]["arguments"] == "{}" and calls[0]["id"] != calls[1]["id"]
    headers = [f for d in deltas for f in d.tool_calls or () if "id" in f]
    assert len(headers) == 2
    end = shaper.finish(Delta(text="", finish_reason="stop"))
    assert end[-1].finish_reason == "tool_calls"
    if step == 1:
        assert len([f for d in deltas for f in d.tool_calls or ()]) > 10, "arguments arrive as they are generated"


def test_named_call_streams_every_piece_as_arguments() -> None:
    shaper = CallShaper({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "a"}}})
    join, _ = _feed(shaper, '{"x": 5}', 2)
    (call,) = join.calls()
    assert call["function"] == {"name": "a", "arguments": '{"x": 5}'}
    assert shaper.finish(Delta(text="", finish_reason="length"))[-1].finish_reason == "length"


def test_auto_streams_text_and_parses_the_call_forms_of_three_families() -> None:
    shaper = CallShaper({"tools": TOOLS})
    _, deltas = _feed(shaper, "Hello there", 3)
    assert "".join(d.text for d in deltas) == "Hello there"
    assert shaper.finish(Delta(text="", finish_reason="stop"))[-1].finish_reason == "stop"
    for text in ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>',  # Hermes / Qwen
                 '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}]',  # Mistral
                 '{"name": "a", "parameters": {"x": 1}}'):  # Llama 3
        calls, content = parse_calls(text, {"a", "b"})
        assert calls == [("a", '{"x": 1}')] and content == "", text
    assert parse_calls('{"name": "zzz", "arguments": {}}', {"a"}) == ([], '{"name": "zzz", "arguments": {}}')
    held = CallShaper({"tools": TOOLS})
    assert _feed(held, '<tool_call>{"name": "b", "arguments": {}}</tool_call>', 5)[1] == []
    out = held.finish(Delta(text="", finish_reason="stop"))
    assert out[0].tool_calls[0]["function"]["name"] == "b" and out[-1].finish_reason == "tool_calls"


def test_constrained_schemas_for_each_option() -> None:
    required, param = constrained_schema({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    assert param == "tools" and required["maxItems"] == 1 and len(required["items"]["anyOf"]) == 2
    named, _ = constrained_schema({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "b"}}})
    assert named == {"type": "object", "properties": {}}
    assert constrained_schema({"response_format": {"type": "json_object"}}) == ({"type": "object"}, "response_format")
    assert constrained_schema({"tools": TOOLS}) is None, "auto is free text"


def test_a_schema_llguidance_cannot_enforce_is_a_400_naming_the_keyword() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "bogus"}}}
    with pytest.raises(InvalidRequest) as err:
        grammar("m", {"response_format": fmt})
    assert err.value.param == "response_format.json_schema.schema" and "bogus" in str(err.value)
    assert grammar("m", {"response_format": {"type": "json_object"}})


def test_llama_server_gets_named_choice_as_required_and_at_least_one_alternative() -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], options={
        "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "b"}}})
    body = {"messages": request.messages, **request.options}
    assert adapt_body(body, request) == (None, False)
    assert body["tool_choice"] == "required" and [t["function"]["name"] for t in body["tools"]] == ["b"]
    chat = GenerationRequest(messages=[{"role": "user", "content": "hi"}], options={"logprobs": True})
    body = {"messages": chat.messages, "logprobs": True}
    assert adapt_body(body, chat) == (0, False) and body["top_logprobs"] == 1
    completion = GenerationRequest(prompt="hi", options={"logprobs": 0})
    body = {"prompt": "hi", "logprobs": 0}
    assert adapt_body(body, completion) == (0, False) and body["logprobs"] == 1
    with pytest.raises(InvalidRequest, match="engine llamacpp"):
        check_options("m", GenerationRequest(messages=[], options={"tools": TOOLS, "logprobs": True}))


def test_llama_server_with_a_template_without_tools_gets_the_fallback() -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}],
                                options={"tools": TOOLS, "tool_choice": "required"})
    body = {"messages": request.messages, **request.options}
    assert adapt_body(body, request, takes_tools=False) == (None, True)
    assert "tools" not in body and body["response_format"]["json_schema"]["schema"]["type"] == "array"
    assert body["messages"][0]["role"] == "system" and '"name": "a"' in body["messages"][0]["content"]


def test_a_conversation_with_calls_is_written_out_for_a_template_without_tools() -> None:
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}}]},
                {"role": "tool", "tool_call_id": "c", "content": "42"}]
    out = plain_conversation(messages, None)
    assert out == [{"role": "assistant", "content": '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'},
                   {"role": "tool", "content": "42"}]


def test_engine_streams_become_tool_call_and_logprob_deltas() -> None:
    chat = SSEDecoder(chat=True, top_logprobs=1)
    fragment = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "a", "arguments": ""}}
    entry = {"id": 5, "token": "x", "logprob": -0.5, "bytes": [120],
             "top_logprobs": [{"id": 5, "token": "x", "logprob": -0.5, "bytes": [120]},
                              {"id": 6, "token": "y", "logprob": -1.5, "bytes": [121]}]}
    (delta,) = chat.feed("data: " + json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]},
                                                             "logprobs": {"content": [entry]}}]}))
    assert delta.tool_calls == [fragment]
    assert delta.logprobs == [{"token": "x", "logprob": -0.5, "bytes": [120],
                               "top_logprobs": [{"token": "x", "logprob": -0.5, "bytes": [120]}]}]
    completion = SSEDecoder(chat=False)
    (delta,) = completion.feed("data: " + json.dumps({"choices": [{"index": 0, "text": "ab", "logprobs": {
        "tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{"a": -1.0}, {"b": -2.0}]}}]}))
    assert [e["token"] for e in delta.logprobs] == ["a", "b"]
    assert completion_logprobs(delta.logprobs, offset=3) == {
        "tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{"a": -1.0}, {"b": -2.0}],
        "text_offset": [3, 4]}


def test_vllm_tool_parser_by_architecture_and_marker_token(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}, "added_tokens": []}))
    assert tool_parser(tmp_path, "Qwen2ForCausalLM")[0] == "hermes"
    parser, why = tool_parser(tmp_path, "LlamaForCausalLM")
    assert parser == "hermes" and "<|python_tag|>" in why and "fallback" in why
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {}},
                                                         "added_tokens": [{"content": "<|python_tag|>"}]}))
    assert tool_parser(tmp_path, "LlamaForCausalLM")[0] == "llama3_json"
    assert tool_parser(tmp_path, "GPT2LMHeadModel")[0] == "hermes"
    assert tool_parser(tmp_path, "GPT2LMHeadModel", "pythonic")[0] == "pythonic"
    assert tool_parser(tmp_path, "Qwen2ForCausalLM", "none")[0] is None


def test_a_request_that_uses_none_of_it_reaches_the_engine_without_options() -> None:
    """No options, no processor: the transformers engine builds its RequestDecoding only for
    requests with options, so plain chat decodes exactly as before."""
    spec = ModelSpec(name="m", weights="/nonexistent", size_bytes=1, context_length=64)
    body = validate(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": False,
                                  "tool_choice": "auto", "tools": [], "response_format": {"type": "text"},
                                  "frequency_penalty": 0, "logit_bias": {}, "parallel_tool_calls": True})
    assert to_generation_request(body, spec).options == {}


def test_vllm_starts_with_the_parser_and_a_manifest_entry_can_set_engine_options(tiny_models, tmp_path) -> None:
    from clearml_umem.engines import EngineContext
    from clearml_umem.engines.vllm_engine import VLLMEngine
    from clearml_umem.engines.vllm_process import Endpoint
    from clearml_umem.spec import SpecError, spec_from_mapping

    ctx = EngineContext(work_dir=tmp_path, device="cpu")
    qwen = spec_from_mapping({"name": "q", "weights": str(tiny_models["tiny-qwen2"]), "engine": "vllm"})
    command = VLLMEngine(qwen, ctx).command(Endpoint(port=1))
    assert command[command.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in command
    off = spec_from_mapping({"name": "q", "weights": str(tiny_models["tiny-qwen2"]), "engine": "vllm",
                             "engine_options": {"tool_call_parser": "none"}})
    engine = VLLMEngine(off, ctx)
    assert "--tool-call-parser" not in engine.command(Endpoint(port=1))
    with pytest.raises(InvalidRequest) as err:
        engine.check_request(GenerationRequest(messages=[{"role": "user", "content": "hi"}], options={"tools": TOOLS}))
    assert err.value.param == "tools" and "engine vllm" in str(err.value)
    with pytest.raises(SpecError, match="engine_options"):
        spec_from_mapping({"name": "q", "weights": str(tiny_models["tiny-qwen2"]), "engine_options": [1]})
