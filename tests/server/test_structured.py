"""Structured outputs and tool calls through the official `openai` client, on a tiny random
model: whatever the weights, the grammar makes every finished output valid."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.live_server import LiveServer

CHAT = [{"role": "user", "content": "Give me the record as JSON."}]

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "ok": {"type": "boolean"}},
             "required": ["name", "age", "ok"], "additionalProperties": False},
    "nested_enum": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "where": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["x"], "additionalProperties": False}},
        "required": ["color", "where"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                        "minItems": 1, "maxItems": 3}},
              "required": ["tags"], "additionalProperties": False},
}

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
CITY = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def srv(llama_artifact):
    from server.config import ServerConfig

    s = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], max_model_len=2048)).wait()
    yield s
    s.close()


@pytest.fixture
def oai(srv):
    return srv.client(timeout=120)


def _fmt(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_validates(oai, name):
    for seed in range(3):  # sampled, so different documents each time
        r = oai.chat.completions.create(model="tiny-chat", messages=CHAT, response_format=_fmt(name),
                                        max_tokens=300, temperature=1.0, seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMAS[name])


def test_json_object_and_n_samples_in_one_batch(oai):
    r = oai.chat.completions.create(model="tiny-chat", messages=CHAT, response_format={"type": "json_object"},
                                    max_tokens=300, temperature=1.0, seed=1, n=3)
    for c in r.choices:
        if c.finish_reason == "stop":  # an open-ended object may run out of tokens; a finished one parses
            assert isinstance(json.loads(c.message.content), dict)
    r = oai.chat.completions.create(model="tiny-chat", messages=CHAT, response_format=_fmt("flat"),
                                    max_tokens=300, temperature=1.0, seed=1, n=3)
    assert [c.finish_reason for c in r.choices] == ["stop"] * 3
    docs = [json.loads(c.message.content) for c in r.choices]
    for d in docs:
        jsonschema.validate(d, SCHEMAS["flat"])
    assert len({json.dumps(d) for d in docs}) > 1  # each row has its own matcher (and sample)


def test_streamed_equals_non_streamed(oai):
    kw = dict(model="tiny-chat", messages=CHAT, response_format=_fmt("nested_enum"), max_tokens=300, temperature=0)
    full = oai.chat.completions.create(**kw).choices[0].message.content
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_completions_endpoint_and_guided_extensions(oai):
    r = oai.completions.create(model="tiny-chat", prompt="Answer:", max_tokens=300, temperature=1.0, seed=2,
                               extra_body={"response_format": _fmt("flat")})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["flat"])
    r = oai.completions.create(model="tiny-chat", prompt="Pick:", max_tokens=20, temperature=1.0, seed=3,
                               extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert r.choices[0].text in {"yes", "no", "maybe"} and r.choices[0].finish_reason == "stop"
    r = oai.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=20, temperature=1.0, seed=4,
                                    extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"})
    text = r.choices[0].message.content
    assert len(text) == 6 and text[:2].isupper() and text[2] == "-" and text[3:].isdigit()


def test_grammar_that_cannot_finish_ends_with_length(oai):
    r = oai.chat.completions.create(model="tiny-chat", messages=CHAT, response_format=_fmt("flat"), max_tokens=3,
                                    temperature=0)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("extra,param,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}},
     "response_format.json_schema.name", "pattern"),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [ADD, ADD]}, "tools", "unique"),
    ({"tools": [ADD], "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
])
def test_bad_grammar_requests_are_400_naming_the_parameter(srv, extra, param, needle):
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny-chat", "messages": CHAT, **extra},
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def _args(call) -> dict:
    return json.loads(call.function.arguments)


def test_required_tool_call_validates_against_the_function_schema(oai):
    for seed in range(3):
        r = oai.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "2+3?"}],
                                        tools=[ADD, CITY], tool_choice="required", max_tokens=300,
                                        temperature=1.0, seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert c.message.tool_calls and all(t.id.startswith("call_") for t in c.message.tool_calls)
        for t in c.message.tool_calls:
            schema = {"add": ADD, "weather": CITY}[t.function.name]["function"]["parameters"]
            jsonschema.validate(_args(t), schema)


def test_named_tool_choice_and_single_call(oai):
    r = oai.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "weather?"}],
                                    tools=[ADD, CITY], tool_choice={"type": "function", "function": {"name": "weather"}},
                                    parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=5)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "weather" and _args(calls[0])["city"] in {"Paris", "Oslo"}


def test_tool_round_trip_and_streamed_tool_calls(oai):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    kw = dict(model="tiny-chat", tools=[ADD], max_tokens=300, temperature=0)
    first = oai.chat.completions.create(messages=msgs, tool_choice="required", **kw)
    call = first.choices[0].message.tool_calls[0]
    # streamed: the same call (name + arguments) arrives as tool_calls deltas, then finish_reason tool_calls
    chunks = list(oai.chat.completions.create(messages=msgs, tool_choice="required", stream=True, **kw))
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas][:1] == [(call.function.name,
                                                                             call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the history; with tool_choice none the answer is text
    alone = oai.chat.completions.create(messages=msgs, tool_choice="none", **kw)
    msgs += [first.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    again = oai.chat.completions.create(messages=msgs, tool_choice="none", **kw)
    assert again.choices[0].message.tool_calls is None and isinstance(again.choices[0].message.content, str)
    # the call (<tool_call> block with its arguments) and the result are in the prompt
    assert again.usage.prompt_tokens > alone.usage.prompt_tokens + len(call.function.arguments) // 4


def test_auto_tool_choice_gives_a_call_or_text_never_a_broken_call(oai):
    kinds = set()
    for seed in range(6):
        r = oai.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                        tools=[ADD], tool_choice="auto", max_tokens=60, temperature=1.0, seed=seed)
        c = r.choices[0]
        if c.message.tool_calls:
            kinds.add("call")
            assert c.finish_reason == "tool_calls"
            jsonschema.validate(_args(c.message.tool_calls[0]), ADD["function"]["parameters"])
        else:
            kinds.add("text")
            assert not (c.message.content or "").startswith("<tool_call>")
