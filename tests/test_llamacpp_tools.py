"""Function calling, structured output and logprobs through the router to a real llama-server (its
Jinja chat templates, tool-call parsing and grammars), with the OpenAI SDK and LangChain."""

from __future__ import annotations

import openai
import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.spec import spec_from_mapping
from clearml_umem.tinygguf import DEMO_GGUF, ensure_tiny_gguf
from tests import openai_tools_checks as checks
from tests.llamacpp_env import needs_llama_server, server_env
from tests.routerproc import start_router

pytestmark = [pytest.mark.slow, needs_llama_server]

ROOM = 400
"""llama.cpp's JSON grammars allow up to ~22 whitespace tokens between tokens of JSON: room for them."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    files = ensure_tiny_gguf(tmp_path_factory.mktemp("gguf"), DEMO_GGUF[:1])
    (name, path), = files.items()
    work = tmp_path_factory.mktemp("tools-router")
    manifest = work / "models.yaml"
    write_manifest(manifest, [spec_from_mapping({"name": name, "weights": str(path)})])
    router = start_router(manifest, work, "--device", "cpu", env=server_env())
    yield router, name
    router.kill()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_named_tool_choice(client, served) -> None:
    checks.named_call(client, served[1], ROOM)


def test_required_tool_choice_streamed(client, served) -> None:
    checks.required_call_streamed(client, served[1], ROOM)


def test_tool_results_in_the_conversation_and_a_json_schema_answer(client, served) -> None:
    checks.conversation_with_tool_results(client, served[1], ROOM)


def test_json_object_mode(client, served) -> None:
    checks.json_object(client, served[1])


def test_chat_and_completion_logprobs(client, served) -> None:
    checks.chat_logprobs(client, served[1])
    checks.completion_logprobs(client, served[1])


def test_client_mistakes_are_400s_naming_the_field(client, served) -> None:
    checks.client_mistakes(client, served[1])


def test_logprobs_with_tools_are_refused_naming_model_and_engine(client, served) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=served[1], messages=checks.ASK, tools=checks.TOOLS, logprobs=True,
                                       tool_choice="required", max_tokens=5)
    assert err.value.body["param"] == "logprobs" and "engine llamacpp" in err.value.body["message"]


def test_langchain_tool_call_and_structured_output(served) -> None:
    checks.langchain_agent_calls(served[0].url + "/v1", served[1], ROOM)
