"""Function calling, structured output, logprobs, penalties and logit_bias against the real router
process serving a tiny model with the transformers engine (llama.cpp: test_llamacpp_integration.py,
vLLM: test_vllm_integration.py run the same checks)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.spec import spec_from_mapping
from tests import openai_tools_checks as checks
from tests.routerproc import start_router

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def router(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("tools-router")
    manifest = work / "models.yaml"
    write_manifest(manifest, [spec_from_mapping({"name": "tiny-qwen2", "weights": str(tiny_models["tiny-qwen2"])})])
    proc = start_router(manifest, work, "--device", "cpu")
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)


MODEL = "tiny-qwen2"


def test_named_tool_choice_gives_one_call_matching_the_schema(client) -> None:
    checks.named_call(client, MODEL)


def test_required_tool_choice_streams_incremental_tool_call_deltas(client) -> None:
    fragments = checks.required_call_streamed(client, MODEL)
    assert len(fragments) > 2, "the arguments arrive in several pieces, not in one at the end"


def test_tool_results_in_the_conversation_and_a_json_schema_answer(client) -> None:
    checks.conversation_with_tool_results(client, MODEL)


def test_json_object_mode(client) -> None:
    checks.json_object(client, MODEL)


def test_chat_logprobs_streamed_and_not(client) -> None:
    checks.chat_logprobs(client, MODEL)


def test_completion_logprobs(client) -> None:
    checks.completion_logprobs(client, MODEL)


def test_client_mistakes_are_400s_naming_the_field(client) -> None:
    checks.client_mistakes(client, MODEL)


def test_a_schema_llguidance_cannot_enforce_is_a_400_naming_the_keyword(client) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=checks.ASK, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert err.value.body["param"] == "response_format.json_schema.schema"
    assert "look-around" in err.value.body["message"] and "transformers" in err.value.body["message"]


def test_logit_bias_forces_and_bans_tokens_with_openai_semantics(client, tiny_models) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[MODEL])
    (b,) = tokenizer.encode("b", add_special_tokens=False)
    forced = client.chat.completions.create(model=MODEL, messages=checks.ASK, max_tokens=4, temperature=0,
                                            logit_bias={str(b): 100}, logprobs=True)
    assert [e.token for e in forced.choices[0].logprobs.content] == ["b"] * 4
    plain = client.chat.completions.create(model=MODEL, messages=checks.ASK, max_tokens=1, temperature=0,
                                           logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    (first_id,) = tokenizer.encode(first, add_special_tokens=False)
    banned = client.chat.completions.create(model=MODEL, messages=checks.ASK, max_tokens=1, temperature=0,
                                            logit_bias={str(first_id): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != first
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=checks.ASK, max_tokens=1, logit_bias={"999999": 1})
    assert err.value.body["param"] == "logit_bias"


def test_presence_penalty_stops_a_greedy_repeat(client) -> None:
    """Greedy decoding of a random model repeats itself; a full presence penalty (2) on top of a
    frequency penalty makes every next token one not yet generated, while the plain answer repeats."""
    plain = client.chat.completions.create(model=MODEL, messages=checks.ASK, max_tokens=24, temperature=0,
                                           logprobs=True)
    plain_tokens = [e.token for e in plain.choices[0].logprobs.content]
    assert len(set(plain_tokens)) < len(plain_tokens), "the unpenalised greedy answer repeats a token"
    penalised = client.chat.completions.create(model=MODEL, messages=checks.ASK, max_tokens=24, temperature=0,
                                               presence_penalty=2, frequency_penalty=2, logprobs=True)
    tokens = [e.token for e in penalised.choices[0].logprobs.content]
    assert len(set(tokens)) > len(set(plain_tokens))


def test_langchain_tool_call_and_structured_output(router) -> None:
    checks.langchain_agent_calls(router.url + "/v1", MODEL)


def test_tool_choice_none_and_plain_chat_are_answered_as_text(client, router) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=checks.ASK, tools=checks.TOOLS,
                                            tool_choice="none", max_tokens=5)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")
    raw = httpx.post(router.url + "/v1/chat/completions", json={"model": MODEL, "messages": checks.ASK,
                                                                 "max_tokens": 3}, timeout=60).json()
    assert "tool_calls" not in raw["choices"][0]["message"] and raw["choices"][0]["logprobs"] is None
