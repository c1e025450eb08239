"""HTTP errors in the OpenAI shape on a real server: 200 generated invalid bodies are each a
400 naming the field (never a 500), malformed JSON, auth on every route and path variant,
the concurrency cap (429), client disconnects of non-streaming requests."""

from __future__ import annotations

import http.client as http_client
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_fixtures import write_engine_test_model
from http_helpers import CPU, MODEL, ScriptedEngine, ServerThread, base_url
from jaxserve import AsyncLLM, LLM
from jaxserve.engine import faults
from jaxserve.engine.async_llm import EngineDeadError

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("http-errors-model")
    write_engine_test_model(path)
    a = AsyncLLM(engine=LLM(str(path), config=CPU).engine, model_name=MODEL)
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def loop():
    st_ = ServerThread()
    yield st_
    st_.close()


@pytest.fixture(scope="module")
def http(engine, loop):
    frontend = loop.serve(engine)
    with httpx.Client(base_url=base_url(frontend), timeout=60) as client:
        yield client


COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}

not_number = st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2), st.just({}))
not_int = st.one_of(not_number, st.floats(allow_nan=False, allow_infinity=False))  # 1.0 is not an int either
not_bool = st.one_of(st.integers(), st.text(max_size=5), st.floats(allow_nan=False, allow_infinity=False))
not_str = st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=2))


def floats(lo=None, hi=None):
    return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)


SHARED = {
    "temperature": st.one_of(floats(hi=-1e-3), not_number),
    "top_p": st.one_of(floats(lo=1.001, hi=1e9), floats(hi=0.0), not_number),
    "n": st.one_of(st.integers(max_value=0), st.integers(min_value=17, max_value=10**9), not_int),
    "presence_penalty": st.one_of(floats(lo=2.001, hi=1e9), floats(hi=-2.001), not_number),
    "frequency_penalty": st.one_of(floats(lo=2.001, hi=1e9), floats(hi=-2.001), not_number),
    "stop": st.one_of(st.integers(), st.just([""]), st.lists(st.integers(), min_size=1, max_size=2)),
    "seed": not_int,
    "logit_bias": st.one_of(st.just({"abc": 1}), st.just({"5": 200.0}), st.just({"-1": 1.0}),
                            st.just({"99999": 1.0}), st.just([1, 2]), st.just({"5": "x"})),
    "top_k": st.one_of(st.integers(max_value=-2), not_int),
    "min_p": st.one_of(floats(lo=1.001, hi=1e9), floats(hi=-1e-3), not_number),
    "repetition_penalty": st.one_of(floats(hi=0.0), not_number),
    "min_tokens": st.one_of(st.integers(max_value=-1), st.integers(min_value=5, max_value=10**6), not_int),
    "stop_token_ids": st.one_of(st.just([-1]), st.just([99999]), st.just("x"), st.just([1.5])),
    "ignore_eos": not_bool,
    "skip_special_tokens": not_bool,
    "stream": not_bool,
    "stream_options": st.one_of(st.just({"include_usage": "yes"}), st.integers()),
    "model": not_str,
    "user": not_str,
}
COMPLETION_ONLY = {
    "prompt": st.one_of(st.just(""), st.just([]), st.just([[]]), st.just([-1]), st.just([99999]), st.just(["", "x"]),
                        st.just([5] * 600), st.just([1.5]), st.integers(), st.just({"a": 1}), st.just([["a"]])),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=600, max_value=10**9), not_int),
    "logprobs": st.one_of(st.integers(min_value=21, max_value=10**6), st.integers(max_value=-1), not_int),
    "echo": not_bool,
    "best_of": st.one_of(st.integers(max_value=0), not_int),  # below n (1); best_of > n is served
    "suffix": st.just("tail"),
}
CHAT_ONLY = {
    "messages": st.one_of(st.just([]), st.just("x"), st.just([{"role": "bogus", "content": "x"}]),
                          st.just([{"content": "x"}]), st.just([{"role": "user", "content": 5}]),
                          st.just([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                          st.just([{"role": "user", "content": "word " * 600}])),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=600, max_value=10**9), not_int),
    "max_completion_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=600, max_value=10**9),
                                       not_int),
    "top_logprobs": st.one_of(st.integers(min_value=21, max_value=10**6), st.integers(max_value=-1), not_int),
    "tools": st.one_of(st.just("x"), st.just([{"type": "bogus"}]), st.just([TOOL, TOOL]),
                       st.just([{"type": "function", "function": {"name": "bad name!"}}])),
    "tool_choice": st.one_of(st.just("bogus"), st.just("auto"), st.just("required"), st.integers(),
                             st.just({"type": "function", "function": {"name": "nope"}})),
    "response_format": st.one_of(st.just({"type": "json_schema"}), st.just({"type": "bogus"}), st.just("x"),
                                 st.just({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 3}}})),
    "chat_template_kwargs": st.one_of(st.just({"tokenize": True}), st.just([1])),
}


@st.composite
def invalid_bodies(draw):
    chat = draw(st.booleans())
    fields = {**SHARED, **(CHAT_ONLY if chat else COMPLETION_ONLY)}
    field = draw(st.sampled_from(sorted(fields)))
    body = dict(CHAT if chat else COMPLETION)
    body[field] = draw(fields[field])
    if field == "top_logprobs":
        body["logprobs"] = True
    if field == "tool_choice" and body[field] in ("auto", {"type": "function", "function": {"name": "nope"}}):
        body["tools"] = [TOOL]  # valid tools; this server has no tool parser, so "auto" is refused
    return ("/v1/chat/completions" if chat else "/v1/completions"), field, body


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
        assert param in error["message"], error
    return error


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=invalid_bodies())
def test_invalid_bodies_are_400_naming_the_field(http, case):
    path, field, body = case
    assert_openai_error(http.post(path, json=body), 400, field)


def test_server_keeps_serving_after_invalid_bodies(http):
    r = http.post("/v1/completions", json={**COMPLETION, "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert http.get("/health").status_code == 200


def test_malformed_and_non_object_bodies(http):
    for raw in (b"{", b"", b"not json", b'{"prompt": "x",}'):
        error = assert_openai_error(http.post("/v1/completions", content=raw), 400)
        assert "JSON" in error["message"] and error["code"] == "invalid_json"
    for raw in (b"[1, 2]", b'"x"', b"5"):
        assert "JSON object" in assert_openai_error(http.post("/v1/chat/completions", content=raw), 400)["message"]
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL}), 400, "prompt")
    assert_openai_error(http.post("/v1/chat/completions", json={"model": MODEL}), 400, "messages")
    error = assert_openai_error(http.post("/v1/completions", json={**COMPLETION, "max_tokens": 600}), 400, "max_tokens")
    assert "<= 510" in error["message"] and "512" in error["message"]  # the limit, with the numbers
    assert_openai_error(http.post("/v1/completions", json={**COMPLETION, "model": "nope"}), 404, "model")
    assert_openai_error(http.get("/v1/completions"), 405)
    assert_openai_error(http.get("/nowhere"), 404)


ROUTES = [("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL}", None),
          ("POST", "/v1/completions", COMPLETION), ("POST", "/v1/chat/completions", CHAT),
          ("POST", "/tokenize", {"prompt": "Hi"}), ("POST", "/detokenize", {"tokens": [5, 6]})]
VARIANTS = ["//v1/completions", "/v1//completions", "/v1/completions/", "/./v1/completions",
            "/v1/../v1/completions", "/health/../v1/completions", "/%2Fv1/completions", "/v1/%2E%2E/v1/completions",
            "///v1///chat//completions"]


def raw_request(port: int, method: str, path: str, body: dict | None, key: str | None) -> tuple[int, dict]:
    """http.client sends the path exactly as written (httpx would rewrite `//v1/...`)."""
    conn = http_client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read() or b"null")
    conn.close()
    return status, data


def test_auth_on_every_route_and_path_variant(engine, loop):
    frontend = loop.serve(engine, api_key=KEY)
    try:
        port = frontend.port
        routes = ROUTES + [("POST", v, CHAT if "chat" in v else COMPLETION) for v in VARIANTS]
        for method, path, body in routes:
            for key in (None, "wrong", KEY[:-1], KEY + "x", ""):
                status, data = raw_request(port, method, path, body, key)
                assert status == 401, (path, key, status)
                assert data["error"]["code"] == "invalid_api_key"
            status, data = raw_request(port, method, path, body, KEY)
            assert status == 200, (path, status, data)
        for path in ("/health", "/metrics"):
            assert httpx.get(f"http://127.0.0.1:{port}{path}").status_code == 200
        assert raw_request(port, "GET", "/nowhere", None, None)[0] == 401  # unknown paths are not probed
        assert raw_request(port, "GET", "/nowhere", None, KEY)[0] == 404
    finally:
        loop.stop(frontend)


def test_concurrency_cap_is_429(engine, loop):
    slow = ScriptedEngine(engine.tokenizer, ["tick "] * 200, delay=0.05)  # ~10 s unless the client leaves
    frontend = loop.serve(slow, max_concurrent=1)
    url = base_url(frontend)
    try:
        long = {**COMPLETION, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as a, a.stream("POST", "/v1/completions", json=long) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the stream
            assert next(line for line in lines if line.startswith("data: "))
            with httpx.Client(base_url=url, timeout=60) as b:
                error = assert_openai_error(b.post("/v1/chat/completions", json=CHAT), 429)
                assert error["type"] == "rate_limit_error" and "1" in error["message"]
                assert b.get("/v1/models").status_code == 200  # only generation counts
        deadline = time.monotonic() + 10
        while frontend.state.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert frontend.state.in_flight == 0 and slow.aborted  # the client left: its request was aborted
        slow.pieces = ["done"]
        assert httpx.post(url + "/v1/completions", json=COMPLETION, timeout=60).status_code == 200
    finally:
        loop.stop(frontend)


def test_non_streaming_client_disconnect_aborts(engine, http):
    total = engine.stats()["num_total_pages"]
    aborted = engine.metrics.requests.labels(status="abort", model_name=MODEL)
    before = aborted._value.get()
    body = {**COMPLETION, "max_tokens": 400, "ignore_eos": True}
    # 5 ms a step: 400 tokens take >= 2 s, so the 0.3 s read timeout always leaves mid-request.
    with faults.installed(engine.engine, faults.Faults(step_delay_s=0.005)):
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    deadline = time.monotonic() + 20
    while (engine.num_in_flight or engine.stats()["num_free_pages"] != total) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_in_flight == 0 and engine.stats()["num_free_pages"] == total
    assert aborted._value.get() - before == 3


class DyingEngine(ScriptedEngine):
    """Streams `pieces`, then dies (EngineDeadError), as AsyncLLM does when a step fails."""

    async def generate(self, prompt, params, request_id):
        async for delta in super().generate(prompt, params, request_id):
            if delta.finished:
                self.healthy = False
                raise EngineDeadError("the engine stopped: RuntimeError('device lost')")
            yield delta


def test_dead_engine_is_503(engine, loop):
    dying = DyingEngine(engine.tokenizer, ["a", "b", "c"])
    frontend = loop.serve(dying)
    try:
        with httpx.Client(base_url=base_url(frontend), timeout=60) as client:
            assert client.get("/health").status_code == 200
            with client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert r.status_code == 200 and events[-1] == "[DONE]"
            assert "device lost" in json.loads(events[-2])["error"]["message"]  # the stream says why it ended
            assert client.get("/health").status_code == 503
            dying.pieces = ["x"]
            error = assert_openai_error(client.post("/v1/completions", json=COMPLETION), 503)
            assert error["code"] == "engine_dead"
    finally:
        loop.stop(frontend)
