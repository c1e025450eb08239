"""Bad input over HTTP, generated from a table of fields x bad values (2^31, 2^63, 2^64,
-2^63-1, negatives, NaN, +-inf, 1e39, wrong types, null) on /v1/completions and
/v1/chat/completions against the real engine: every answer is a 4xx naming the field, none a
5xx, and afterwards the same greedy request gives the same tokens and the engine is healthy.
Also: admission by engine sequences (prompts x n) under --max-concurrent."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from engine_fixtures import write_engine_test_model
from http_helpers import CPU, MODEL, ScriptedEngine, ServerThread, base_url
from jaxserve import AsyncLLM, LLM

NAN, INF = float("nan"), float("inf")
# Label -> value; the labels keep failure reports readable (NaN != NaN, 2**63 is long).
VALUES = {
    "2^31": 2**31, "2^63": 2**63, "2^64": 2**64, "-2^63-1": -(2**63) - 1, "-1": -1, "-2": -2,
    "NaN": NAN, "inf": INF, "-inf": -INF, "1e39": 1e39, "1.5": 1.5,
    "'abc'": "abc", "[]": [], "{}": {}, "null": None, "true": True,
}
ALL = frozenset(VALUES)
BIG_FLOATS = {"2^31", "2^63", "2^64", "1.5"}  # valid where any float >= 0 within float32 is

# field -> (how the value goes into the body, the labels that are VALID for it and so are
# left out). The place function returns the body's extra fields.
direct = lambda field: lambda v: {field: v}  # noqa: E731
SHARED: dict[str, tuple] = {
    "n": (direct("n"), set()),
    "temperature": (direct("temperature"), BIG_FLOATS | {"null"}),
    "top_p": (direct("top_p"), {"null"}),
    "top_k": (direct("top_k"), {"-1", "null"}),
    "min_p": (direct("min_p"), {"null"}),
    "repetition_penalty": (direct("repetition_penalty"), BIG_FLOATS | {"null"}),
    "presence_penalty": (direct("presence_penalty"), {"-1", "-2", "1.5", "null"}),
    "frequency_penalty": (direct("frequency_penalty"), {"-1", "-2", "1.5", "null"}),
    "seed": (direct("seed"), {"2^31", "2^63", "-1", "-2", "null"}),
    "min_tokens": (direct("min_tokens"), set()),
    "stop_token_ids": (direct("stop_token_ids"), {"[]", "null"}),
    "stop_token_ids[i]": (lambda v: {"stop_token_ids": [v]}, set()),
    "logit_bias": (direct("logit_bias"), {"{}", "null"}),
    "logit_bias key": (lambda v: {"logit_bias": {json.dumps(v): 1.0}}, set()),
    "logit_bias value": (lambda v: {"logit_bias": {"5": v}}, {"-1", "-2", "1.5"}),
    "stop": (direct("stop"), {"'abc'", "[]", "null"}),
    "stream": (direct("stream"), {"true"}),
    "stream_options": (direct("stream_options"), {"{}", "null"}),
    "ignore_eos": (direct("ignore_eos"), {"true"}),
    "skip_special_tokens": (direct("skip_special_tokens"), {"true"}),
    "model": (direct("model"), {"null"}),
}
COMPLETION_ONLY: dict[str, tuple] = {
    "max_tokens": (direct("max_tokens"), {"null"}),
    "logprobs": (direct("logprobs"), {"null"}),
    "prompt": (direct("prompt"), {"'abc'"}),
    "prompt[i]": (lambda v: {"prompt": [v]}, {"'abc'"}),
    "best_of": (direct("best_of"), {"null"}),
    "prompt_logprobs": (direct("prompt_logprobs"), {"null"}),
    "echo": (direct("echo"), {"true"}),
    "suffix": (direct("suffix"), {"null"}),
}
CHAT_ONLY: dict[str, tuple] = {
    "messages": (direct("messages"), set()),
    "max_tokens": (direct("max_tokens"), {"null"}),
    "max_completion_tokens": (direct("max_completion_tokens"), {"null"}),
    "logprobs": (direct("logprobs"), {"true"}),
    "top_logprobs": (lambda v: {"logprobs": True, "top_logprobs": v}, {"null"}),
    "tools": (direct("tools"), {"[]", "null"}),
    "tool_choice": (direct("tool_choice"), {"null"}),
    "add_generation_prompt": (direct("add_generation_prompt"), {"true"}),
}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
GREEDY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
          "ignore_eos": True}


def cases() -> list[tuple[str, str, str, dict]]:
    """(path, field, value label, body) for every bad (field, value) of both endpoints."""
    out = []
    for path, base, table in (("/v1/completions", COMPLETION, {**SHARED, **COMPLETION_ONLY}),
                              ("/v1/chat/completions", CHAT, {**SHARED, **CHAT_ONLY})):
        for field, (place, valid) in table.items():
            for label in sorted(ALL - valid):
                out.append((path, field, label, {**base, **place(VALUES[label])}))
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad-input-model")
    write_engine_test_model(path)
    a = AsyncLLM(engine=LLM(str(path), config=CPU).engine, model_name=MODEL)
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def loop():
    st_ = ServerThread()
    yield st_
    st_.close()


def post(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    # json.dumps writes NaN / Infinity as the JSON extensions Python and pydantic read.
    return client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def test_bad_values_are_4xx_naming_the_field(engine, loop):
    frontend = loop.serve(engine)
    try:
        with httpx.Client(base_url=base_url(frontend), timeout=60) as client:
            before = post(client, "/v1/completions", GREEDY)
            assert before.status_code == 200, before.text
            table = cases()
            assert len(table) >= 300
            failures, statuses = [], {}
            start = time.monotonic()
            for path, field, label, body in table:
                r = post(client, path, body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                try:
                    error = r.json()["error"]
                except Exception:  # noqa: BLE001 - not the OpenAI error shape
                    error = None
                name = field.split("[")[0].split(" ")[0]  # "logit_bias key" / "prompt[i]": the body's field
                named = error is not None and (error.get("param") == name or name in str(error.get("message")))
                if not 400 <= r.status_code < 500 or not named:
                    failures.append((path, field, label, r.status_code, r.text[:200]))
            elapsed = time.monotonic() - start
            print(f"\n{len(table)} bad requests in {elapsed:.1f} s, statuses {statuses}")
            assert not failures, "\n".join(map(str, failures[:40])) + f"\n({len(failures)} of {len(table)})"
            assert not any(s >= 500 for s in statuses)
            # The engine survived all of it: healthy, nothing held, the same greedy tokens.
            assert engine.healthy and client.get("/health").status_code == 200
            after = post(client, "/v1/completions", GREEDY)
            assert after.status_code == 200, after.text
            assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
            assert engine.wait_idle(10) and engine.num_in_flight == 0
            stats = engine.stats()
            assert stats["num_free_pages"] == stats["num_total_pages"]
    finally:
        loop.stop(frontend)


def test_admission_counts_sequences(engine, loop):
    """--max-concurrent caps engine sequences (prompts x n), not HTTP requests: a request
    larger than the whole cap is a 400 naming the field, one beside a full cap is a 429."""
    slow = ScriptedEngine(engine.tokenizer, ["tick "] * 200, delay=0.05)  # ~10 s unless the client leaves
    frontend = loop.serve(slow, max_concurrent=4)
    url = base_url(frontend)
    try:
        with httpx.Client(base_url=url, timeout=60) as b:
            too_many = b.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c"], "n": 2})
            assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
            assert "6 sequences" in too_many.json()["error"]["message"]
            too_wide = b.post("/v1/chat/completions", json={**CHAT, "n": 5})
            assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "n"
            assert frontend.state.in_flight_seqs == 0
        long = {**COMPLETION, "prompt": ["a", "b"], "n": 2, "stream": True}  # 4 sequences: the whole cap
        with httpx.Client(base_url=url, timeout=60) as a, a.stream("POST", "/v1/completions", json=long) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the stream
            assert next(line for line in lines if line.startswith("data: "))
            assert frontend.state.in_flight_seqs == 4 and frontend.state.in_flight == 1
            with httpx.Client(base_url=url, timeout=60) as b:
                error = b.post("/v1/chat/completions", json=CHAT)  # one HTTP request, one sequence
                assert error.status_code == 429 and error.json()["error"]["type"] == "rate_limit_error"
                assert "sequences" in error.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while (frontend.state.in_flight or frontend.state.in_flight_seqs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert frontend.state.in_flight == 0 and frontend.state.in_flight_seqs == 0
        slow.pieces = ["done"]
        ok = httpx.post(url + "/v1/completions", json={**COMPLETION, "prompt": ["a", "b"], "n": 2}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
        assert frontend.state.in_flight_seqs == 0
    finally:
        loop.stop(frontend)
