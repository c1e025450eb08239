"""`make serve` as a user runs it: the Makefile's SERVE_ARGS (ports swapped for free ones) in a
real `jaxserve serve` process on the demo model.

- Tool calling: the official openai client's tool-calling request returns a call, streamed and
  not: the demo template renders the tools, the model's answer is forced to a hermes call by
  a grammar (random weights make noise otherwise), and the hermes parser
  (--enable-auto-tool-choice --tool-call-parser hermes) turns that text into `tool_calls`.
- Readiness: a thread polls HTTP /health, /ready, /live and gRPC health from the moment the
  process is spawned until it has exited; the last test drains it with SIGTERM under load.
  The observed sequence must be: (refused while Python starts, the two ports bind a moment
  apart) -> starting / NOT_SERVING -> ok / SERVING -> draining / NOT_SERVING -> (refused only
  after the server logged "closing the ports", its last step before exiting).
"""

from __future__ import annotations

import datetime
import json
import shlex
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.entrypoints.client import Client
from jaxserve.sampling_params import SamplingParams
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


class Prober(threading.Thread):
    """Polls the probes every POLL_S; records each change of (health, ready, live, grpc) with the
    time since spawn and the wall-clock time the poll ended (compared with the time stamp of the
    server's "closing the ports" line, its last step)."""

    POLL_S = 0.1

    def __init__(self, server: ServeProcess, grpc_port: int, http_port: int):
        super().__init__(daemon=True)
        self.server, self.http = server, f"http://127.0.0.1:{http_port}"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        # One client for every poll: a client's TLS context loads the CA bundle (40 s of CPU
        # over a cold start's polls); no kept-alive connections, so every poll connects anew
        # and a closed port still reads "refused"
        self.client = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))
        self.start_time = time.monotonic()
        self.observations: list[tuple[float, float, tuple[str, ...]]] = []

    def _http(self, path: str) -> str:
        try:
            r = self.client.get(self.http + path)
            return f"{r.status_code} {r.json().get('status')}"
        except httpx.ConnectError:
            return "refused"

    def _grpc(self) -> str:
        try:
            status = self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as e:
            return "refused" if e.code() == grpc.StatusCode.UNAVAILABLE else e.code().name

    def run(self) -> None:
        while True:
            exited = self.server.proc.poll() is not None
            state = (self._http("/health"), self._http("/ready"), self._http("/live"), self._grpc())
            if not self.observations or self.observations[-1][2] != state:
                self.observations.append((time.monotonic() - self.start_time, time.time(), state))
            if exited:
                self.channel.close()
                self.client.close()
                return
            time.sleep(self.POLL_S)

    def states(self) -> list[tuple[str, ...]]:
        return [s for _, _, s in self.observations]


@pytest.fixture(scope="module")
def make_serve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("make-serve")
    grpc_port, http_port = free_port(), free_port()
    args = with_ports(make_serve_args(), grpc_port, http_port)
    assert "--enable-auto-tool-choice" in args and args[args.index("--tool-call-parser") + 1] == "hermes"
    server = ServeProcess(args, _env(tmp))
    prober = Prober(server, grpc_port, http_port)
    prober.start()
    try:
        server.wait_for_port(STARTUP_TIMEOUT_S)
        with Client(f"127.0.0.1:{grpc_port}", timeout=60) as client:
            client.wait_until_serving(STARTUP_TIMEOUT_S)
        server.prober = prober
        yield server, grpc_port, http_port
    finally:
        server.kill()


def openai_client(http_port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=120)


def metric_values(http_port: int) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=30).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def counted(values: dict, name: str, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_exclude_the_warm_up_and_count_refusals_by_reason(make_serve):
    """First in the module: nothing but the server's own warm-up has run."""
    server, grpc_port, http_port = make_serve
    before = metric_values(http_port)
    assert not [k for k in before if k[0] == "jaxserve_requests_total"]  # the warm-up is not a request
    assert counted(before, "jaxserve_generation_tokens_total") == 0
    assert counted(before, "jaxserve_prompt_tokens_total") == 0
    assert counted(before, "jaxserve_e2e_request_latency_seconds_count") == 0
    url = f"http://127.0.0.1:{http_port}"
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    ok = {"model": model, "prompt": "Hello there", "max_tokens": 2, "ignore_eos": True}
    for _ in range(3):
        assert httpx.post(url + "/v1/completions", json=ok, timeout=60).status_code == 200
    sent = {400: [dict(ok, max_tokens=-1), dict(ok, temperature="hot")], 404: [dict(ok, model="nope")]}
    for status, bodies in sent.items():
        for body in bodies:
            assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == status
    assert httpx.get(url + "/v1/no-such-route", timeout=30).status_code == 404
    with Client(f"127.0.0.1:{grpc_port}", timeout=60) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.generate([10**6], SamplingParams(max_tokens=2))  # not a token id of the model
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = metric_values(http_port)
    assert counted(after, "jaxserve_requests_total", status="length") == 3
    assert counted(after, "jaxserve_generation_tokens_total") == 6
    assert counted(after, "jaxserve_requests_rejected_total", reason="invalid_request") == 3  # 2 HTTP + 1 gRPC
    assert counted(after, "jaxserve_requests_rejected_total", reason="not_found") == 2
    rejected = {k: v for k, v in after.items() if k[0] == "jaxserve_requests_rejected_total"}
    assert sum(rejected.values()) == 5, rejected
    # one access-log line per request, with its status, tokens and id
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum("POST /v1/completions" in x for x in server.lines) < 6:
        time.sleep(0.1)
    lines = [x for x in server.lines if "jaxserve.access" in x]
    ok_lines = [x for x in lines if "POST /v1/completions 200 prompt_tokens=" in x]
    assert len(ok_lines) == 3 and all("output_tokens=2 " in x and "id=cmpl-" in x for x in ok_lines), lines
    assert sum("POST /v1/completions 400 " in x for x in lines) == 2
    assert sum("POST /v1/completions 404 " in x for x in lines) == 1
    assert sum("GET /v1/no-such-route 404 " in x for x in lines) == 1
    assert sum("GenerationService/Generate INVALID_ARGUMENT" in x for x in lines) == 1
    assert not any("/health" in x or "/metrics" in x or "grpc.health" in x for x in lines)  # probes: not logged


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


def test_the_readmes_tool_calling_example_runs_against_make_serve(make_serve, tmp_path):
    """The README's openai tool-calling block, as written but for the port, prints a parsed call."""
    import re
    import subprocess
    import sys

    _, _, http_port = make_serve
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (code,) = [textwrap.dedent(b) for b in blocks if "tool_calls" in b and "OpenAI(" in b]
    assert "127.0.0.1:8000" in code
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "tool_calls get_weather {'city': 'Paris'}"


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


def test_probes_from_spawn_to_exit_with_a_drain_under_load(make_serve):
    """Must run last in this module: it drains and stops the server."""
    server, grpc_port, http_port = make_serve
    prober: Prober = server.prober
    deadline = time.monotonic() + 30
    while prober.states()[-1] != ("200 ok", "200 ok", "200 alive", "SERVING") and time.monotonic() < deadline:
        time.sleep(0.1)
    # A long stream in flight keeps the drain going for a while: 120 tokens are about 3 s of drain at the
    # tests' -O0 and 1 s at XLA's defaults, ten polls or more (with 300 this test took 21 s of a cold make test).
    client = openai_client(http_port)
    stream = client.completions.create(model=client.models.list().data[0].id, prompt="Once upon a time",
                                       max_tokens=120, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].text is not None
    server.proc.send_signal(signal.SIGTERM)
    text = "".join(c.choices[0].text for c in stream)  # the drain lets it finish
    assert server.proc.wait(120) == 0
    prober.join(30)
    assert text and any("draining" in line for line in server.lines)

    obs = prober.observations
    states = prober.states()
    first_answer = next(i for i, s in enumerate(states) if "refused" not in s)
    print(f"both ports answered {obs[first_answer][0]:.2f} s after spawn; states: {states}")
    for s in states[:first_answer]:  # Python still importing, then one port bound before the other
        assert set(s) <= {"refused", "503 starting", "200 alive", "NOT_SERVING"}, states
    # once both are bound, never refused until the server logged "closing the ports"
    (closing,) = [x for x in server.lines if "closing the ports" in x]
    closed_at = datetime.datetime.strptime(closing[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    for t, wall, state in obs[first_answer:]:
        assert "refused" not in state or wall >= closed_at, (t, state, states)
    answered = [s for _, _, s in obs[first_answer:] if "refused" not in s]
    starting = ("503 starting", "503 starting", "200 alive", "NOT_SERVING")
    serving = ("200 ok", "200 ok", "200 alive", "SERVING")
    draining = ("503 draining", "503 draining", "200 alive", "NOT_SERVING")
    # http and gRPC change a moment apart: mixed pairs may show between two phases
    phases = [s for s in answered if s in (starting, serving, draining)]
    assert phases[0] == starting and serving in phases and phases[-1] == draining
    assert phases == sorted(phases, key=[starting, serving, draining].index)  # in this order, no going back
    for s in answered:
        assert s[2] == "200 alive"  # /live never failed: nothing died
