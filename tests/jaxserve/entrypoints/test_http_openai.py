"""The OpenAI-compatible HTTP API through the official `openai` client, on a real server on
127.0.0.1: texts equal LLM.generate, streaming, n, stop, seed, logprobs, usage, the other
routes, metrics, client disconnects and drain."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine_fixtures import write_engine_test_model
from http_helpers import CPU, MODEL, ScriptedEngine, ServerThread, base_url
from jaxserve import AsyncLLM, LLM, SamplingParams

PROMPTS = ["Hello world", "The capital of France is"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]
GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
SAMPLED = dict(n=2, seed=7, temperature=0.8, top_p=0.9, max_tokens=10, ignore_eos=True)
TOKEN_PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
BATCH = dict(n=2, seed=3, temperature=1.0, max_tokens=6, ignore_eos=True)
EXTRAS = dict(top_k=20, min_p=0.05, repetition_penalty=1.3, min_tokens=3, stop_token_ids=[7], ignore_eos=True)
STANDARD = dict(seed=5, temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3, max_tokens=10)
CHAT_SAMPLED = dict(n=2, seed=11, temperature=0.9, max_tokens=8, ignore_eos=True)
STORIES = [f"Story number {i}: once upon a time" for i in range(40)]
QUITTERS = set(range(3, 40, 4))  # 10 of the 40 streaming clients leave after two chunks


def generate(llm, prompt, **params):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def chat_ids(llm, messages=MESSAGES) -> list[int]:
    enc = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)
    return list(enc["input_ids"])


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("http-model")
    write_engine_test_model(path)
    return LLM(str(path), config=CPU)


@pytest.fixture(scope="module")
def want(llm) -> dict:
    """Every LLM.generate oracle, computed before the AsyncLLM starts: the two share one
    LLMEngine and must never step it at the same time."""
    w: dict = {"greedy": [generate(llm, p, **GREEDY).outputs[0] for p in PROMPTS],
               "sampled": generate(llm, PROMPTS[0], **SAMPLED),
               "batch": [generate(llm, p, **BATCH) for p in TOKEN_PROMPTS],
               "extras": generate(llm, PROMPTS[0], **STANDARD, **EXTRAS, logit_bias={11: 8.0, 12: -100.0}),
               "chat_ids": chat_ids(llm),
               "lp": generate(llm, PROMPTS[0], max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3).outputs[0],
               "stories": llm.generate([STORIES[i] for i in range(40) if i not in QUITTERS],
                                       SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), use_tqdm=False)}
    w["stop"] = w["greedy"][1].text[5:8]
    w["stopped"] = generate(llm, PROMPTS[1], **{**GREEDY, "stop": [w["stop"]]}).outputs[0]
    w["chat_greedy"] = generate(llm, w["chat_ids"], **GREEDY).outputs[0]
    w["chat_sampled"] = generate(llm, w["chat_ids"], **CHAT_SAMPLED)
    w["chat_stop"] = w["chat_sampled"].outputs[0].text[3:6]
    w["chat_stopped"] = generate(llm, w["chat_ids"], **CHAT_SAMPLED, stop=w["chat_stop"]).outputs[0]
    w["chat_lp"] = generate(llm, w["chat_ids"], max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2).outputs[0]
    return w


@pytest.fixture(scope="module")
def engine(llm, want):
    a = AsyncLLM(engine=llm.engine, model_name=MODEL)  # shares the compiled engine: LLM is not used from here on
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    st = ServerThread()
    frontend = st.serve(engine)
    yield st, frontend
    st.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=base_url(server[1]) + "/v1", api_key="unused", max_retries=0)


def api(params: dict) -> dict:
    """SamplingParams keywords as openai-client arguments (our extras go in extra_body)."""
    params = dict(params)
    extra = {k: params.pop(k) for k in ("ignore_eos", "top_k", "min_p", "repetition_penalty", "min_tokens",
                                        "stop_token_ids") if k in params}
    return {**params, "extra_body": extra}


def test_completions_equal_llm_generate(want, client):
    for prompt, expected in zip(PROMPTS, want["greedy"]):
        got = client.completions.create(model=MODEL, prompt=prompt, **api(GREEDY))
        assert got.choices[0].text == expected.text
        assert got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens == 12
        stream = client.completions.create(model=MODEL, prompt=prompt, stream=True, **api(GREEDY))
        assert "".join(c.choices[0].text for c in stream) == expected.text
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2)
    assert got.usage.prompt_tokens == len(want["sampled"].prompt_token_ids)


def test_completions_n_seed_stop_and_batches(want, client):
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], **api(SAMPLED))
    assert [c.text for c in got.choices] == [o.text for o in want["sampled"].outputs]
    assert got.usage.completion_tokens == 20

    got = client.completions.create(model=MODEL, prompt=PROMPTS[1], stop=[want["stop"]], **api(GREEDY)).choices[0]
    assert (got.text, got.finish_reason) == (want["stopped"].text, "stop") and want["stop"] not in got.text

    # a batch of token-id prompts, n=2, streamed: choice i*n+k is sample k of prompt i
    stream = client.completions.create(model=MODEL, prompt=TOKEN_PROMPTS, stream=True,
                                       stream_options={"include_usage": True}, **api(BATCH))
    texts, usage = {}, None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert [texts[i] for i in range(4)] == [o.text for w in want["batch"] for o in w.outputs]
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 24)


def test_penalties_bias_and_extra_fields_reach_the_sampler(want, client):
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], logit_bias={"11": 8, "12": -100}, user="u-1",
                                    **api({**STANDARD, **EXTRAS})).choices[0]
    assert (got.text, got.finish_reason) == (want["extras"].outputs[0].text, want["extras"].outputs[0].finish_reason)


def test_chat_equals_llm_generate_on_templated_prompt(want, client):
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, **api(GREEDY))
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want["chat_greedy"].text
    assert got.usage.prompt_tokens == len(want["chat_ids"]) and got.usage.completion_tokens == 12

    sampled = api(CHAT_SAMPLED)
    sampled["max_completion_tokens"] = sampled.pop("max_tokens")
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, **sampled)
    texts, roles, finish, usage = {}, set(), {}, None
    for chunk in stream:
        for c in chunk.choices:
            roles.add(c.delta.role)
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [o.text for o in want["chat_sampled"].outputs]
    assert "assistant" in roles and finish == {0: "length", 1: "length"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(want["chat_ids"]), 16)

    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, stop=want["chat_stop"], **sampled)
    assert got.choices[0].message.content == want["chat_stopped"].text and got.choices[0].finish_reason == "stop"


def test_logprobs(want, client):
    expected = want["lp"]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0.0, logprobs=3,
                                    extra_body={"ignore_eos": True}).choices[0].logprobs
    sampled = [lp[t].logprob for t, lp in zip(expected.token_ids, expected.logprobs)]
    assert got.token_logprobs == pytest.approx(sampled)
    assert len(got.tokens) == 5 and all(1 <= len(top) <= 4 for top in got.top_logprobs)
    assert got.text_offset[0] == 0 and got.text_offset == sorted(got.text_offset)

    expected = want["chat_lp"]
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0.0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = got.choices[0].logprobs.content
    sampled = [lp[t].logprob for t, lp in zip(expected.token_ids, expected.logprobs)]
    assert [c.logprob for c in content] == pytest.approx(sampled)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_models_tokenize_detokenize_and_unknown_model(llm, server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    tok = llm.get_tokenizer()
    http = httpx.Client(base_url=base_url(server[1]))
    r = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == tok("Hello world")["input_ids"] and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512
    assert http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"] == chat_ids(llm)
    assert http.post("/detokenize", json={"tokens": tok.encode("Hello world", add_special_tokens=False)}).json() == \
        {"prompt": "Hello world"}
    r = http.post("/detokenize", json={"tokens": [5, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert http.get("/health").status_code == 200


def test_chat_template_override_and_missing(llm, engine, server, tmp_path):
    st, frontend = server
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    override = st.serve(engine, chat_template=str(template))
    try:
        r = httpx.post(base_url(override) + "/tokenize", json={"messages": MESSAGES, "add_special_tokens": False})
        rendered = "system: You are terse.\nuser: Name three rivers.\nassistant:"
        assert r.json()["tokens"] == llm.get_tokenizer().encode(rendered, add_special_tokens=False)
    finally:
        st.stop(override)
    tok = llm.get_tokenizer()
    saved, tok.chat_template = tok.chat_template, None
    try:
        r = httpx.post(base_url(frontend) + "/v1/chat/completions", json={"messages": MESSAGES})
    finally:
        tok.chat_template = saved
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "chat_template_missing" and "--chat-template" in r.json()["error"]["message"]


def scrape(frontend) -> dict[tuple[str, tuple], float]:
    r = httpx.get(base_url(frontend) + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_move_as_requests_are_served(engine, server, client):
    frontend = server[1]
    before = scrape(frontend)
    for name in ("jaxserve_num_requests_running", "jaxserve_num_requests_waiting", "jaxserve_kv_cache_pages_used",
                 "jaxserve_preemptions_total", "jaxserve_prefix_cache_hit_tokens_total",
                 "jaxserve_prefix_cache_query_tokens_total", "jaxserve_compile_count"):
        assert (name, ()) in before, name
    assert before[("jaxserve_kv_cache_pages_total", ())] == engine.stats()["num_total_pages"] > 0
    client.completions.create(model=MODEL, prompt=PROMPTS[0] + " again", max_tokens=7, temperature=0.0,
                              extra_body={"ignore_eos": True})
    after = scrape(frontend)

    def moved(name, labels=()):
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved("jaxserve_requests_total", (("status", "length"),)) == 1
    assert moved("jaxserve_generation_tokens_total") == 7
    assert moved("jaxserve_prompt_tokens_total") >= 4
    # Histogram observation counts (not durations): one TTFT, six inter-token gaps, one e2e.
    ttft, tpot, e2e = (f"jaxserve_{m}_count" for m in ("time_to_first_token_seconds",
                                                        "time_per_output_token_seconds", "e2e_request_latency_seconds"))
    assert (moved(ttft), moved(tpot), moved(e2e)) == (1, 6, 1)
    assert moved("jaxserve_prefix_cache_query_tokens_total") >= 4  # the prompt was looked up


def test_disconnecting_10_of_40_streams(want, engine, server):
    total = engine.stats()["num_total_pages"]
    before = scrape(server[1]).get(("jaxserve_requests_total", (("status", "abort"),)), 0.0)

    async def one(http, i):
        body = {"model": MODEL, "prompt": STORIES[i], "max_tokens": 200 if i in QUITTERS else 10,
                "temperature": 0.0, "ignore_eos": True, "stream": True}
        text, chunks = "", 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text += json.loads(line[6:])["choices"][0]["text"]
                chunks += 1
                if i in QUITTERS and chunks == 2:
                    return None  # closes the connection mid-stream
        return text

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base_url(server[1]), timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(40)))

    texts = asyncio.run(main())
    deadline = time.monotonic() + 10
    while (engine.num_in_flight or engine.stats()["num_free_pages"] != total) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_in_flight == 0 and engine.stats()["num_free_pages"] == total
    kept = [i for i in range(40) if i not in QUITTERS]
    assert [texts[i] for i in kept] == [o.outputs[0].text for o in want["stories"]]
    after = scrape(server[1])[("jaxserve_requests_total", (("status", "abort"),))]
    assert after - before == len(QUITTERS)


def test_drain_finishes_in_flight_then_stops(llm, server):
    st = server[0]
    slow = ScriptedEngine(llm.get_tokenizer(), ["tick "] * 20, delay=0.05)  # one second of streaming
    frontend = st.serve(slow)
    url = base_url(frontend)
    body = {"model": MODEL, "prompt": "Hello world", "stream": True}
    with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        stopping = asyncio.run_coroutine_threadsafe(frontend.stop(grace=30.0), st.loop)
        for _ in range(100):
            if frontend.draining:
                break
            time.sleep(0.01)
        with httpx.Client(base_url=url, timeout=10) as other:
            assert other.get("/health").status_code == 503
            refused = other.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert other.get("/metrics").status_code == 200
        assert frontend.state.in_flight == 1 and not stopping.done()
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    text = first["choices"][0]["text"] + "".join(c["choices"][0]["text"] for c in rest)
    assert text == "tick " * 20 and rest[-1]["choices"][0]["finish_reason"] == "stop"
    stopping.result(30)
    st.frontends.remove(frontend)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_drain_grace_exceeded_aborts_streams(engine, server):
    st = server[0]
    frontend = st.serve(engine)
    body = {"model": MODEL, "prompt": "Hello world", "max_tokens": 400, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=base_url(frontend), timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        stopping = asyncio.run_coroutine_threadsafe(frontend.stop(grace=0.1), st.loop)
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert rest[-1]["choices"][0]["finish_reason"] == "abort"
    stopping.result(30)
    st.frontends.remove(frontend)
