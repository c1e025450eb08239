"""Structured outputs through the front ends, on a real engine (tiny random model, CPU preset)
at temperature 1: the official `openai` client with response_format json_schema / json_object,
vLLM's structured_outputs extra body, tool_choice "required" and a named function (streamed
and not: jsonschema validates every answer); the gRPC structured_outputs field (Client and
raw stub); bad grammars are a 400 / INVALID_ARGUMENT naming the field with llguidance's
message; nothing compiles after warm-up."""

from __future__ import annotations

import json
import re

import grpc
import httpx
import jsonschema
import openai
import pytest

from grpc_fixtures import wait_engine_idle
from http_helpers import MODEL, ServerThread, base_url
from jaxserve import SamplingParams, StructuredOutputsParams
from jaxserve.entrypoints.client import Client
from jaxserve.protos.v1 import generate_pb2 as pb
from random_schemas import random_schemas

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["tz"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
ARGS = {"get_weather": WEATHER, "get_time": TIME}
SAMPLED = dict(temperature=1.0, max_tokens=120)


@pytest.fixture(scope="module", autouse=True)
def warm_compiles(engine) -> int:
    return engine.stats()["compile_count"]


# The grammar, not the prompt, is under test: a template that does not list the tools keeps the
# prompts short (the demo template's tool listing with max_tokens 200 would not fit max_model_len 512).
NO_TOOLS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                     "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                     "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def http(engine):
    st = ServerThread()
    frontend = st.serve(engine, chat_template=NO_TOOLS_TEMPLATE)
    yield openai.OpenAI(base_url=base_url(frontend) + "/v1", api_key="unused", max_retries=0), base_url(frontend)
    st.close()


@pytest.fixture(scope="module")
def grpc_server(loop, engine):
    frontend = loop.start_frontend(engine)
    yield frontend
    loop.run(frontend.stop(0))


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def streamed_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def test_response_format_json_schema(http):
    client, _ = http
    for seed in range(4):
        got = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=json_schema_format(SCHEMA),
                                             seed=seed, **SAMPLED)
        assert got.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(got.choices[0].message.content), SCHEMA)
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=seed, stream=True,
                                                response_format=json_schema_format(SCHEMA), **SAMPLED)
        text, finish = streamed_text(stream)
        assert finish == "stop" and text == got.choices[0].message.content  # same seed, same answer
    obj = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"},
                                         seed=1, temperature=1.0, max_tokens=200)
    text = obj.choices[0].message.content
    assert text.startswith("{")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_structured_outputs_extra_body_on_both_endpoints(http):
    client, _ = http
    for k, schema in enumerate(random_schemas(6, seed=21)):
        got = client.completions.create(model=MODEL, prompt="JSON:", seed=k, extra_body={"structured_outputs": {
            "json": schema}}, **SAMPLED)
        jsonschema.validate(json.loads(got.choices[0].text), schema)
    fmt = client.completions.create(model=MODEL, prompt="JSON:", seed=9, extra_body={
        "response_format": json_schema_format(SCHEMA)}, **SAMPLED)  # vLLM takes response_format here too
    jsonschema.validate(json.loads(fmt.choices[0].text), SCHEMA)
    regex = client.completions.create(model=MODEL, prompt="Call", n=3, seed=2, temperature=1.0, max_tokens=20,
                                      extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})
    assert all(re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.text) for c in regex.choices)
    choice = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=3, temperature=1.0, max_tokens=20,
                                            extra_body={"structured_outputs": {"choice": ["sunny", "rain", "fog"]}})
    assert choice.choices[0].message.content in ("sunny", "rain", "fog")
    guided = client.completions.create(model=MODEL, prompt="Call", seed=4, temperature=1.0, max_tokens=20,
                                       extra_body={"guided_regex": "[a-c]{2,5}"})  # vLLM's older name
    assert re.fullmatch("[a-c]{2,5}", guided.choices[0].text)
    guided = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=5, extra_body={"guided_json": SCHEMA},
                                            **SAMPLED)
    jsonschema.validate(json.loads(guided.choices[0].message.content), SCHEMA)


def check_calls(calls, max_calls: int | None = None) -> None:
    assert calls and (max_calls is None or len(calls) <= max_calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), ARGS[call.function.name])
        assert call.id.startswith("call_") and call.type == "function"


def streamed_calls(stream) -> tuple[list[dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            assert not c.delta.content
            for tc in c.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                call["arguments"] += tc.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


def test_tool_choice_required(http):
    client, _ = http
    for seed in range(4):
        got = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                             seed=seed, temperature=1.0, max_tokens=200)
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        check_calls(choice.message.tool_calls)
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                                seed=seed, temperature=1.0, max_tokens=200, stream=True)
        calls, finish = streamed_calls(stream)
        assert finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    one = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, seed=9, temperature=1.0, max_tokens=200)
    check_calls(one.choices[0].message.tool_calls, max_calls=1)


def test_tool_choice_named_function(http):
    client, _ = http
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        got = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=named,
                                             seed=seed, temperature=1.0, max_tokens=60)
        calls = got.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["get_time"]
        check_calls(calls)
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=named,
                                                seed=seed, temperature=1.0, max_tokens=60, stream=True)
        streamed, _ = streamed_calls(stream)
        assert [(c["name"], c["arguments"]) for c in streamed] == [("get_time", calls[0].function.arguments)]


def test_bad_grammars_are_400_naming_the_field(http):
    _, url = http

    def error(path: str, body: dict) -> dict:
        r = httpx.post(url + path, json={"model": MODEL, "max_tokens": 5, **body}, timeout=60)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    chat = {"messages": MESSAGES}
    e = error("/v1/chat/completions", {**chat, "response_format": json_schema_format({"type": "strnig"})})
    assert e["param"] == "response_format" and "strnig" in e["message"]
    e = error("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a(b"}})
    assert e["param"] == "structured_outputs" and "unclosed group" in e["message"]
    e = error("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "start: foo"}})
    assert e["param"] == "structured_outputs" and "unknown name" in e["message"]
    e = error("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}})
    assert e["param"] == "structured_outputs" and "exactly one of" in e["message"]
    e = error("/v1/chat/completions", {**chat, "structured_outputs": {"json": {}},
                                       "response_format": {"type": "json_object"}})
    assert e["param"] == "structured_outputs"
    e = error("/v1/completions", {"prompt": "x", "structured_outputs": {"jsn": {}}})
    assert e["param"] == "structured_outputs" and "unknown fields jsn" in e["message"]
    e = error("/v1/completions", {"prompt": "x", "guided_regex": "a(b"})
    assert e["param"] == "guided_regex" and "unclosed group" in e["message"]
    e = error("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]})
    assert e["param"] == "guided_regex"
    e = error("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema"}})
    assert e["param"] == "response_format"
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(x"}}}}}]
    e = error("/v1/chat/completions", {**chat, "tools": bad_tool, "tool_choice": "required"})
    assert e["param"] == "tools" and "regex" in e["message"]
    e = error("/v1/chat/completions", {**chat, "tools": TOOLS, "tool_choice": "required",
                                       "response_format": {"type": "json_object"}})
    assert e["param"] == "tool_choice"


def test_grpc_structured_outputs_field(engine, grpc_server, warm_compiles):
    schema = random_schemas(1, seed=5)[0]
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=150, structured_outputs={"json": schema})
    with Client(grpc_server.address, timeout=60) as client:
        out = client.generate("JSON:", params).outputs[0]
        jsonschema.validate(json.loads(out.text), schema)
        text = "".join(d.outputs[0].text for d in client.generate_stream("JSON:", params))
        assert text == out.text
        choice = client.generate("pick", SamplingParams(temperature=1.0, seed=1, max_tokens=10,
                                                        structured_outputs=StructuredOutputsParams(
                                                            choice=["alpha", "beta"]))).outputs[0]
        assert choice.text in ("alpha", "beta")
    with grpc.insecure_channel(grpc_server.address) as channel:
        generate = channel.unary_unary("/jaxserve.v1.GenerationService/Generate",
                                       request_serializer=pb.GenerateRequest.SerializeToString,
                                       response_deserializer=pb.GenerateResponse.FromString)
        for so, field, message in [(pb.StructuredOutputs(regex="a(b"), "structured_outputs.regex", "unclosed group"),
                                   (pb.StructuredOutputs(json='{"type": "strnig"}'), "structured_outputs.json",
                                    "strnig"),
                                   (pb.StructuredOutputs(), "structured_outputs", "exactly one of")]:
            req = pb.GenerateRequest(text="x", sampling_params=pb.SamplingParams(max_tokens=4, structured_outputs=so))
            with pytest.raises(grpc.RpcError) as e:
                generate(req, timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in e.value.details() and message in e.value.details()
    wait_engine_idle(engine)
    assert engine.stats()["compile_count"] == warm_compiles
