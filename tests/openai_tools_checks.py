"""Function calling, structured output and logprobs through the real OpenAI SDK and LangChain,
the same checks for every engine (tests/test_openai_tools.py, the llama.cpp and vLLM jobs).

Tiny random-weight models cannot choose a tool by themselves: the checks use `tool_choice`
`required` or a named function and `json_schema`, where constrained decoding guarantees the
shape, and check that shape (names, arguments matching the schema, finish reasons, deltas). Integers are enums: an
unbounded one lets a random model write digits until max_tokens. Greedy, so a run is
reproducible (a sampled random model may spell a 12-character string in 48 byte tokens);
`max_tokens` leaves room
for the whitespace llama.cpp's JSON grammars allow (a random model spends tokens on it).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import jsonschema
import openai
from pydantic import Field

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "enum": [1, 2, 3]}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "tz": {"type": "string", "enum": ["UTC", "CET"]}},
                                               "required": ["tz"], "additionalProperties": False}}}]
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 16},
                                           "ok": {"type": "boolean"}},
          "required": ["answer", "ok"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def named_call(client: openai.OpenAI, model: str, max_tokens: int = 120) -> None:
    answer = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=max_tokens,
                                            temperature=0,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = answer.choices[0]
    # a named (forced) function ends with "stop" on OpenAI's API and vLLM; the other engines say "tool_calls"
    assert choice.finish_reason in ("tool_calls", "stop"), choice
    assert choice.message.content in (None, "")
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def required_call_streamed(client: openai.OpenAI, model: str, max_tokens: int = 120) -> list[Any]:
    """Streamed as OpenAI streams calls: a fragment with the id and name, then arguments in pieces."""
    stream = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=max_tokens, temperature=0,
                                            stream=True,
                                            stream_options={"include_usage": True})
    fragments = []
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            fragments += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls", finish
    assert fragments and fragments[0].id and fragments[0].function.name in ("get_weather", "get_time")
    assert all(f.index == 0 for f in fragments)
    assert all(f.id is None and not f.function.name for f in fragments[1:]), "the name is sent once"
    arguments = "".join(f.function.arguments or "" for f in fragments)
    schema = WEATHER if fragments[0].function.name == "get_weather" else TOOLS[1]["function"]["parameters"]
    jsonschema.validate(json.loads(arguments), schema)
    return fragments


def conversation_with_tool_results(client: openai.OpenAI, model: str, max_tokens: int = 120) -> None:
    """An assistant's call and the tool's answer in the conversation, then a json_schema answer."""
    messages = [*ASK,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}]
    answer = client.chat.completions.create(  # no tools offered now: vLLM's parser would read calls
        model=model, messages=messages, max_tokens=max_tokens, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), ANSWER)


def json_object(client: openai.OpenAI, model: str) -> None:
    answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=40,
                                            response_format={"type": "json_object"})
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:  # out of tokens inside the object: what was produced is still an object's start
        assert answer.choices[0].message.content.lstrip().startswith("{")


def chat_logprobs(client: openai.OpenAI, model: str) -> None:
    answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-4  # greedy picks the most likely
    streamed = client.chat.completions.create(model=model, messages=ASK, max_tokens=5, temperature=0,
                                              logprobs=True, stream=True)
    tokens = [e for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content or ()]
    assert len(tokens) == len(entries)
    assert all(e.top_logprobs == [] for e in tokens), "no top_logprobs asked: none sent"
    assert abs(tokens[0].logprob - entries[0].logprob) < 1e-3
    plain = client.chat.completions.create(model=model, messages=ASK, max_tokens=3)
    assert plain.choices[0].logprobs is None


def completion_logprobs(client: openai.OpenAI, model: str) -> None:
    answer = client.completions.create(model=model, prompt="The tiers are", max_tokens=4, temperature=0, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and all(v <= 0 for v in logprobs.token_logprobs)
    assert logprobs.text_offset[0] == 0
    streamed = client.completions.create(model=model, prompt="The tiers are", max_tokens=4, temperature=0,
                                         logprobs=0, stream=True)
    tokens = [t for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert len(tokens) == 4


def client_mistakes(client: openai.OpenAI, model: str) -> None:
    cases = [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
              "tool_choice.function.name"),
             ({"tool_choice": "required"}, "tool_choice"),
             ({"top_logprobs": 2}, "top_logprobs"),
             ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
             ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
             ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name")]
    for extra, param in cases:
        try:
            client.chat.completions.create(model=model, messages=ASK, max_tokens=2, **extra)
        except openai.BadRequestError as exc:
            assert exc.body["param"] == param, (extra, exc.body)
        else:
            raise AssertionError(f"{extra} was accepted")


def langchain_agent_calls(base_url: str, model: str, max_tokens: int = 120) -> None:
    """LangChain's OpenAI chat model: a forced tool call and a structured answer, as agents use them."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    @tool
    def get_weather(city: Annotated[str, Field(max_length=12)], days: Literal[1, 2, 3]) -> str:
        """Weather for a city over some days."""
        return f"sunny in {city} for {days} days"

    class Answer(BaseModel):
        answer: str = Field(max_length=16)
        ok: bool

    llm = ChatOpenAI(model=model, base_url=base_url, api_key="unused", max_tokens=max_tokens, temperature=0,
                     max_retries=0,
                     timeout=120)
    forced = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True)
    message = forced.invoke("Weather in Paris for 2 days?")
    assert len(message.tool_calls) == 1, message
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "days"}, message
    result = get_weather.invoke(call)  # the agent step: run the tool with the model's arguments
    assert result.tool_call_id == call["id"]
    structured = llm.with_structured_output(Answer, method="json_schema", strict=True).invoke(
        [("user", "Weather in Paris?"), message, result])
    assert isinstance(structured, Answer)
