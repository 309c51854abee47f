"""The shape bounds of a request body (`json_body`): what the parser process and the router both check."""

from __future__ import annotations

import json

import pytest

from clearml_umem.json_body import MAX_JSON_DEPTH, BodyProblem, load_body, load_object, max_values


def _chat(count: int, **extra: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}] * count, **extra}).encode()


def test_messages_over_the_cap_are_refused_naming_messages() -> None:
    assert len(load_body(_chat(10), chat=True, max_messages=10)["messages"]) == 10
    with pytest.raises(BodyProblem) as caught:
        load_body(_chat(11), chat=True, max_messages=10)
    assert (caught.value.param, caught.value.code) == ("messages", "too_many_messages")
    # the messages cap is a chat rule: a completion body's "messages" is just an extra field
    load_body(_chat(11), chat=False, max_messages=10)


def test_values_are_counted_keys_included_and_the_heaviest_field_is_named() -> None:
    # root, model (key + value), messages (key + list), 3 messages of 1 object + 2 keys + 2 values
    body = _chat(3)
    assert max_values(2) == 20
    load_body(body, chat=True, max_messages=2 + 1)  # 20 values, 30 allowed
    with pytest.raises(BodyProblem) as caught:
        load_body(json.dumps({"model": "m", "prompt": "p", "junk": [0] * 40}).encode(), chat=False, max_messages=4)
    assert (caught.value.param, caught.value.code) == ("junk", "too_many_values")
    assert "47 values" in caught.value.message
    # a dict of many keys counts each key
    with pytest.raises(BodyProblem) as caught:
        load_body(json.dumps({"model": "m", "logit_bias": {str(i): 1 for i in range(20)}}).encode(), False, 4)
    assert caught.value.param == "logit_bias" and "45 values" in caught.value.message


def test_shape_problems_are_client_errors() -> None:
    deep = b'{"a": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    with pytest.raises(BodyProblem, match="nested more than"):
        load_object(deep)
    load_object(b'{"a": ' + b"[" * (MAX_JSON_DEPTH - 2) + b"]" * (MAX_JSON_DEPTH - 2) + b"}")
    with pytest.raises(BodyProblem, match="JSON object"):
        load_object(b"[1]")
    with pytest.raises(BodyProblem, match="64 bits"):
        load_object(b'{"seed": ' + b"9" * 5000 + b"}")
    with pytest.raises(BodyProblem) as caught:
        load_object(b'{"messages": [{"content": "\\ud800"}]}')
    assert caught.value.param == "messages.0.content"
