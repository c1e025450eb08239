"""`make serve` as a user runs it: the Makefile's SERVE_ARGS (ports swapped for free ones) in a
real `jaxserve serve` process on the demo model. The official openai client's tool-calling
request returns a call, streamed and not: the demo template renders the tools, the model's
answer is forced to a hermes call by a grammar (random weights make noise otherwise), and
the hermes parser (--enable-auto-tool-choice --tool-call-parser hermes) turns that text into
`tool_calls`."""

from __future__ import annotations

import json
import shlex
import socket
from pathlib import Path

import openai
import pytest

from jaxserve.entrypoints.client import Client
from test_grpc_serve import STARTUP_TIMEOUT_S, ServeProcess, _env

ROOT = Path(__file__).parents[3]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def make_serve_args() -> list[str]:
    """SERVE_ARGS of the Makefile, continuation lines joined, without the leading `serve`."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("SERVE_ARGS ?="))
    args = shlex.split(line.split("?=", 1)[1])
    assert args[0] == "serve"
    return args[1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_ports(args: list[str], grpc_port: int, http_port: int) -> list[str]:
    out = list(args)
    for flag, port in (("--grpc-port", grpc_port), ("--http-port", http_port)):
        out[out.index(flag) + 1] = str(port)
    return out


@pytest.fixture(scope="module")
def make_serve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("make-serve")
    grpc_port, http_port = free_port(), free_port()
    args = with_ports(make_serve_args(), grpc_port, http_port)
    assert "--enable-auto-tool-choice" in args and args[args.index("--tool-call-parser") + 1] == "hermes"
    server = ServeProcess(args, _env(tmp))
    try:
        server.wait_for_port(STARTUP_TIMEOUT_S)
        with Client(f"127.0.0.1:{grpc_port}", timeout=60) as client:
            client.wait_until_serving(STARTUP_TIMEOUT_S)
        yield server, grpc_port, http_port
    finally:
        server.kill()


def openai_client(http_port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_demo_template_renders_the_tools(make_serve):
    from jaxserve.demo_model import CHAT_TEMPLATE, train_tokenizer

    tokenizer = train_tokenizer()
    prompt = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, chat_template=CHAT_TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)
    assert json.dumps(TOOLS[0]["function"]) in prompt and "<tool_call>" in prompt
    _, _, http_port = make_serve
    client = openai_client(http_port)
    # The prompt the server built holds the tools: its token count is the template's.
    got = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, tools=TOOLS,
                                         max_tokens=1)
    assert got.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    plain = client.chat.completions.create(model=got.model, messages=MESSAGES, max_tokens=1)
    assert plain.usage.prompt_tokens < got.usage.prompt_tokens


def test_tool_call_returned_non_streamed(make_serve):
    _, _, http_port = make_serve
    client = openai_client(http_port)
    model = client.models.list().data[0].id
    got = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=64,
                                         extra_body={"structured_outputs": {"choice": [CALL]}})
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_call_returned_streamed(make_serve):
    _, _, http_port = make_serve
    client = openai_client(http_port)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=64, stream=True,
                                            extra_body={"structured_outputs": {"choice": [CALL]}})
    names, args, ids, finish, content = [], "", set(), None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                ids.add(tc.id)
            if tc.function and tc.function.name:
                names.append(tc.function.name)
            args += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and len(ids) == 1  # id and name once, then argument fragments
    assert json.loads(args) == {"city": "Paris"} and finish == "tool_calls" and not content.strip()


def test_content_keeps_its_leading_space_with_the_parser_on(make_serve):
    _, _, http_port = make_serve
    client = openai_client(http_port)
    model = client.models.list().data[0].id
    text = " Hello, it is sunny."
    for stream in (False, True):
        got = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=32,
                                             stream=stream, extra_body={"structured_outputs": {"choice": [text]}})
        if stream:
            content = "".join(c.choices[0].delta.content or "" for c in got)
        else:
            assert got.choices[0].finish_reason == "stop" and not got.choices[0].message.tool_calls
            content = got.choices[0].message.content
        assert content == text


def test_auto_needs_enable_auto_tool_choice():
    from http_helpers import ScriptedEngine, ServerThread, base_url
    from jaxserve.demo_model import train_tokenizer

    loop = ServerThread()
    try:
        frontend = loop.serve(ScriptedEngine(train_tokenizer(), [CALL]), tool_parser="hermes",
                              enable_auto_tool_choice=False)
        client = openai.OpenAI(base_url=base_url(frontend) + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
            client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS, tool_choice="auto")
        # without tool_choice the tools are not shown and nothing is parsed
        got = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS)
        assert got.choices[0].message.content == CALL and not got.choices[0].message.tool_calls
    finally:
        loop.close()


def test_enable_auto_tool_choice_needs_a_parser(capsys):
    from jaxserve.entrypoints.cli import main

    assert main(["--log-level", "WARNING", "serve", "--enable-auto-tool-choice"]) == 2
    assert "--enable-auto-tool-choice needs --tool-call-parser" in capsys.readouterr().err
