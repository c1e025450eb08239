"""Tool calling: the hermes and llama3_json parsers on scripted model outputs, streamed
tool-call deltas (split anywhere), and the chat endpoint's tools / tool_choice handling
through the openai client against a scripted engine (a tiny random model cannot call tools)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from http_helpers import MODEL, ScriptedEngine, ServerThread, base_url
from jaxserve.demo_model import train_tokenizer
from jaxserve.entrypoints.openai.tool_parsers import (HermesToolParser, Llama3JsonToolParser, NamedFunctionParser, ParsedCall,
                                          ToolStreamer)

HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
          '</tool_call>\n<tool_call>{"arguments": {"tz": "CET", "q": "a}\\"b"}, "name": "get_time"}</tool_call>')
LLAMA3 = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
          '{"name": "get_time", "parameters": {"tz": "CET", "q": "a}\\"b"}}')
WANT_CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "CET", "q": 'a}"b'})]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "Weather and time in Paris?"}]


def calls_of(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.named_calls]


def test_hermes_parser():
    p = HermesToolParser()
    parsed = p.parse(HERMES, final=True)
    assert parsed.content == "Let me check." and calls_of(parsed) == WANT_CALLS
    assert p.parse("Just text, no tools.", final=True).content == "Just text, no tools."
    assert p.parse("Hi <tool_c", final=False).content == "Hi"  # may become a tag: held back
    assert p.parse("Hi <tool_cx", final=False).content == "Hi <tool_cx"
    truncated = p.parse('<tool_call>{"name": "get_weather", "arguments": {"city": "Pa', final=True)
    assert truncated.calls == [ParsedCall("get_weather", '{"city": "Pa')]  # cut by max_tokens: partial args
    no_args = p.parse('<tool_call>{"name": "ping"}</tool_call>', final=True)
    assert no_args.calls == [ParsedCall("ping", "{}")]
    string_args = p.parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', final=True)
    assert string_args.calls == [ParsedCall("f", '{"a": 1}')]


def test_llama3_json_parser():
    p = Llama3JsonToolParser()
    assert calls_of(p.parse(LLAMA3, final=True)) == WANT_CALLS
    assert calls_of(p.parse(LLAMA3.removeprefix("<|python_tag|>"), final=True)) == WANT_CALLS
    assert p.parse("The weather is nice.", final=True).content == "The weather is nice."
    assert p.parse('{"city": "Paris"}', final=True).content == '{"city": "Paris"}'  # JSON, not a call
    assert p.parse("<|python", final=False).content == ""  # undecided: held back
    assert p.parse('{"name": "get_weather", "param', final=False).calls == [ParsedCall("get_weather", "")]


def test_named_function_parser():
    p = NamedFunctionParser("get_weather", None)
    assert p.parse('{"city": "Paris"}', final=False).calls == []
    assert p.parse(' {"city": "Paris"} ', final=True).calls == [ParsedCall("get_weather", '{"city": "Paris"}')]
    assert p.parse("no JSON here", final=True).content == "no JSON here"
    hermes = NamedFunctionParser("get_weather", HermesToolParser())
    assert calls_of(hermes.parse(HERMES, final=True)) == WANT_CALLS


def replay(parser, text: str, cuts: list[int]) -> list[dict]:
    streamer, deltas, last = ToolStreamer(parser), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        deltas += streamer.feed(text[last:cut], final=cut == len(text))
        last = cut
    return deltas


def check_stream(deltas: list[dict], parsed) -> None:
    content = "".join(d.get("content", "") for d in deltas)
    assert content == parsed.content
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if tc["index"] not in calls:  # the first delta of a call: id, type, name, empty arguments
                assert tc["id"].startswith("call_") and tc["type"] == "function"
                assert tc["function"]["name"] and tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:  # then argument fragments only
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.name, c.arguments) for c in parsed.named_calls]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["hermes", "llama3_json"]), st.lists(st.integers(0, len(HERMES)), max_size=30))
def test_streamed_deltas_equal_the_whole_parse_however_split(kind, cuts):
    parser, text = (HermesToolParser(), HERMES) if kind == "hermes" else (Llama3JsonToolParser(), LLAMA3)
    check_stream(replay(parser, text, [c for c in cuts if c < len(text)]), parser.parse(text, final=True))


def test_streamed_plain_content_per_character():
    text = "  Plain answer,\nno tools at all.  "
    for parser in (HermesToolParser(), Llama3JsonToolParser()):
        deltas = replay(parser, text, list(range(len(text))))
        assert "".join(d["content"] for d in deltas) == text  # whitespace as written
        assert parser.parse(text, final=True).content == text


def test_content_whitespace_is_kept_around_markup():
    p = HermesToolParser()
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert p.parse(" Hello there", final=True).content == " Hello there"
    assert p.parse(" Hi\n" + call + "\n", final=True).content == " Hi"
    assert p.parse("\n" + call + " after", final=True).content == " after"
    assert p.parse(" Hi ", final=False).content == " Hi"  # the trailing space waits for what follows


# -- through the HTTP server -------------------------------------------------------------


@pytest.fixture(scope="module")
def servers():
    tokenizer = train_tokenizer()
    loop = ServerThread()
    engines = {kind: ScriptedEngine(tokenizer) for kind in ("hermes", "llama3_json", "none")}
    frontends = {kind: loop.serve(engine, tool_parser=None if kind == "none" else kind)
                 for kind, engine in engines.items()}
    clients = {kind: openai.OpenAI(base_url=base_url(f) + "/v1", api_key="x", max_retries=0)
               for kind, f in frontends.items()}
    yield engines, clients, frontends
    loop.close()


def test_tool_calls_non_streaming(servers):
    engines, clients, _ = servers
    for kind, script in (("hermes", HERMES), ("llama3_json", LLAMA3)):
        engines[kind].script(script)
        got = clients[kind].chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == WANT_CALLS
        assert all(c.type == "function" and c.id.startswith("call_") for c in choice.message.tool_calls)
        assert choice.message.content == ("Let me check." if kind == "hermes" else None)
        prompt = engines[kind].tokenizer.decode(engines[kind].prompts[-1])
        assert prompt.endswith("assistant<|end_header_id|>\n\n")
    engines["hermes"].script(HERMES)
    one = clients["hermes"].chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                                    parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.function.name for c in one] == ["get_weather"]


def test_tool_calls_streaming(servers):
    engines, clients, _ = servers
    engines["hermes"].script(HERMES, size=4)
    stream = clients["hermes"].chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, n=2,
                                                       stream=True)
    deltas: dict[int, list[dict]] = {0: [], 1: []}
    finish = {}
    for chunk in stream:
        for c in chunk.choices:
            d = c.delta.model_dump(exclude_none=True, exclude={"role"})
            if d.get("tool_calls"):
                d["tool_calls"] = [{k: v for k, v in tc.items() if v is not None} for tc in d["tool_calls"]]
                for tc in d["tool_calls"]:
                    tc["function"] = {k: v for k, v in tc["function"].items() if v is not None}
            if d and d != {"content": ""}:
                deltas[c.index].append(d)
            finish[c.index] = c.finish_reason or finish.get(c.index)
    parsed = HermesToolParser().parse(HERMES, final=True)
    for k in (0, 1):
        check_stream(deltas[k], parsed)
    assert finish == {0: "tool_calls", 1: "tool_calls"}


def test_tool_choice_modes_and_what_the_template_sees(servers):
    engines, clients, _ = servers
    hermes, client = engines["hermes"], clients["hermes"]
    hermes.tokenizer.chat_template, saved = (
        "{% for t in tools or [] %}[{{ t['function']['name'] }}]{% endfor %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}", hermes.tokenizer.chat_template)
    try:
        hermes.script(HERMES)
        none = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none")
        assert none.choices[0].message.content == HERMES and not none.choices[0].message.tool_calls
        assert "[get_weather]" not in hermes.tokenizer.decode(hermes.prompts[-1])
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required")
        assert hermes.tokenizer.decode(hermes.prompts[-1]).startswith("[get_weather][get_time]")

        hermes.script('{"city": "Paris"}')
        named = {"type": "function", "function": {"name": "get_weather"}}
        got = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=named)
        assert hermes.tokenizer.decode(hermes.prompts[-1]).startswith("[get_weather]Weather")  # only that tool
        call = got.choices[0].message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=named,
                                                stream=True)
        args = "".join(tc.function.arguments or "" for chunk in stream for c in chunk.choices
                       for tc in c.delta.tool_calls or [])
        assert json.loads(args) == {"city": "Paris"}
    finally:
        hermes.tokenizer.chat_template = saved


def test_tools_request_validation(servers):
    _, _, frontends = servers
    url = base_url(frontends["none"]) + "/v1/chat/completions"

    def error(body: dict) -> dict:
        r = httpx.post(url, json={"model": MODEL, "messages": MESSAGES, **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert error({"tools": [{"type": "function", "function": {"name": "bad name"}}]})["param"] == "tools"
    assert error({"tools": [{"type": "retrieval"}]})["param"] == "tools"
    assert error({"tools": [TOOLS[0], TOOLS[0]]})["param"] == "tools"
    assert error({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}})["param"] == \
        "tool_choice"
    assert error({"tool_choice": "required"})["param"] == "tool_choice"
    assert error({"tools": TOOLS, "tool_choice": "maybe"})["param"] == "tool_choice"
    auto = error({"tools": TOOLS, "tool_choice": "auto"})  # this server has no parser
    assert auto["param"] == "tool_choice" and "--tool-call-parser" in auto["message"]
    # Without a parser, tools default to "none": the text comes back as content.
    engines, clients, _ = servers
    engines["none"].script(HERMES)
    got = clients["none"].chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    assert got.choices[0].message.content == HERMES and got.choices[0].finish_reason == "stop"
