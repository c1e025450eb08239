"""The OpenAI completions API through the official `openai` client, on a real server on
127.0.0.1: echo with logprobs and vLLM's prompt_logprobs (against transformers), beam search
(against LLM.beam_search, itself checked against transformers), best_of > n; the gRPC
prompt_logprobs and best_of fields."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from engine_fixtures import write_engine_test_model
from grpc_fixtures import LoopThread
from http_helpers import CPU, MODEL, ServerThread, base_url
from jaxserve import AsyncLLM, BeamSearchParams, Client, LLM, SamplingParams
from jaxserve.outputs import merge_delta

PROMPT = "The capital of France is a city of many rivers and bridges"
MESSAGES = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("http-beam-model")
    hf, _ = write_engine_test_model(path)
    return path, hf


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model[0]), config=CPU, max_num_batched_tokens=32, token_buckets=(16, 32))


@pytest.fixture(scope="module")
def want(llm, model) -> dict:
    """Oracles computed before the AsyncLLM starts (the two share one LLMEngine)."""
    ids = llm.get_tokenizer()(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = model[1](torch.tensor([ids])).logits[0].float()
    w = {"ids": ids, "hf": torch.log_softmax(logits, dim=-1).numpy(),
         "greedy": llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2),
                                use_tqdm=False)[0]}
    w["beams"] = llm.beam_search([PROMPT, "Hello world"],
                                 BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5, early_stopping=True))
    ids = llm.get_tokenizer().apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]
    w["chat_beams"] = llm.beam_search([list(ids)], BeamSearchParams(beam_width=3, max_tokens=5,
                                                                    early_stopping="never"))[0]
    w["best_of"] = llm.generate([PROMPT], SamplingParams(n=2, best_of=4, seed=5, temperature=1.0, max_tokens=6,
                                                         ignore_eos=True), use_tqdm=False)[0]
    return w


@pytest.fixture(scope="module")
def engine(llm, want):
    engine = AsyncLLM(engine=llm.engine, model_name=MODEL)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    st = ServerThread()
    frontend = st.serve(engine)
    yield openai.OpenAI(base_url=base_url(frontend) + "/v1", api_key="unused", max_retries=0)
    st.close()


@pytest.fixture(scope="module")
def grpc_client(engine):
    loop = LoopThread()
    frontend = loop.start_frontend(engine)
    with Client(frontend.address, timeout=60) as c:
        yield c
    loop.run(frontend.stop(0))
    loop.close()


def check_echo(lp, want, k: int, num_completion: int) -> None:
    ids, hf = want["ids"], want["hf"]
    n = len(ids)
    assert len(lp.tokens) == n + num_completion
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx([hf[p - 1, ids[p]] for p in range(1, n)], abs=1e-4)
    for p in range(1, n):
        top = lp.top_logprobs[p]
        assert k <= len(top) <= k + 1
        assert sorted(top.values(), reverse=True)[:k] == pytest.approx(np.sort(hf[p - 1])[::-1][:k], abs=1e-4)
    expected = want["greedy"].outputs[0]
    sampled = [e[t].logprob for t, e in zip(expected.token_ids, expected.logprobs)]
    assert lp.token_logprobs[n:] == pytest.approx(sampled, abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_with_logprobs_covers_the_prompt(client, want):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.0, echo=True, logprobs=2,
              extra_body={"ignore_eos": True})
    got = client.completions.create(**kw).choices[0]
    assert got.text == PROMPT + want["greedy"].outputs[0].text
    check_echo(got.logprobs, want, 2, 4)
    # streamed: the first chunk carries the prompt's text and logprobs
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == got.text
    first = chunks[0].choices[0].logprobs
    assert first.tokens[:len(want["ids"])] == got.logprobs.tokens[:len(want["ids"])]
    merged = [t for c in chunks for t in c.choices[0].logprobs.token_logprobs]
    assert merged[0] is None and merged[1:] == pytest.approx(got.logprobs.token_logprobs[1:], abs=1e-6)


def test_vllm_prompt_logprobs_field(client, want):
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0.0,
                                    extra_body={"prompt_logprobs": 3}).choices[0]
    plp = got.model_extra["prompt_logprobs"]
    ids, hf = want["ids"], want["hf"]
    assert len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        entry = plp[p]
        assert entry[str(ids[p])]["logprob"] == pytest.approx(hf[p - 1, ids[p]], abs=1e-4)
        assert entry[str(ids[p])]["rank"] == 1 + int(np.sum(hf[p - 1] > hf[p - 1, ids[p]]))
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:3] == [1, 2, 3] and len(entry) in (3, 4)
    assert got.logprobs is None


def test_prompt_logprobs_bad_values_are_400(client):
    for bad in (21, -1):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": bad})
        assert e.value.body["param"] == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": "2"})
    assert "prompt_logprobs" in str(e.value.body)


def test_beam_search_fields(client, want):
    kw = dict(model=MODEL, prompt=[PROMPT, "Hello world"], max_tokens=6, n=2, best_of=3, logprobs=1,
              extra_body={"use_beam_search": True, "length_penalty": 0.5, "early_stopping": True})
    got = client.completions.create(**kw)
    expected = [s for out in want["beams"] for s in out.sequences[:2]]
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [s.text for s in expected]
    assert [c.finish_reason for c in got.choices] == [s.finish_reason for s in expected]
    for c, s in zip(got.choices, expected):
        gen = s.tokens[len(s.tokens) - len(s.logprobs):]
        assert c.logprobs.token_logprobs == pytest.approx([e[t].logprob for t, e in zip(gen, s.logprobs)])
        assert sum(c.logprobs.token_logprobs) == pytest.approx(s.cum_logprob, abs=1e-5)
    assert got.usage.completion_tokens == sum(len(s.logprobs) for s in expected)
    chunks = list(client.completions.create(stream=True, **kw))
    assert sorted((ch.choices[0].index, ch.choices[0].text) for ch in chunks) == [
        (c.index, c.text) for c in got.choices]


@pytest.mark.parametrize("fields,param", [({"best_of": 11}, "best_of"), ({"n": 3, "best_of": 2}, "n"),
                                          ({"temperature": 0.7}, "temperature"),
                                          ({"early_stopping": "sometimes"}, "early_stopping")])
def test_beam_search_bad_fields_are_400(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                                  extra_body={"use_beam_search": True, **fields})
    assert e.value.body["param"] == param or param in e.value.body["message"]


def test_best_of_sampling(client, want):
    kw = dict(model=MODEL, prompt=PROMPT, n=2, best_of=4, seed=5, temperature=1.0, max_tokens=6,
              extra_body={"ignore_eos": True})
    got = client.completions.create(**kw)
    assert [c.text for c in got.choices] == [c.text for c in want["best_of"].outputs]
    assert got.usage.completion_tokens == 12
    chunks = list(client.completions.create(stream=True, **kw))
    assert sorted((ch.choices[0].index, ch.choices[0].text) for ch in chunks if ch.choices[0].text) == [
        (c.index, c.text) for c in got.choices]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, n=3, best_of=2, max_tokens=2)
    assert e.value.body["param"] == "best_of"


def test_chat_beam_search(client, want):
    kw = dict(model=MODEL, messages=MESSAGES, n=3, max_tokens=5, logprobs=True,
              extra_body={"use_beam_search": True, "early_stopping": "never"})
    got = client.chat.completions.create(**kw)
    expected = want["chat_beams"].sequences
    assert [c.message.content for c in got.choices] == [s.text for s in expected]
    for c, s in zip(got.choices, expected):
        assert sum(t.logprob for t in c.logprobs.content) == pytest.approx(s.cum_logprob, abs=1e-5)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert [(ch.choices[0].index, ch.choices[0].delta.content) for ch in chunks] == [
        (c.index, c.message.content) for c in got.choices]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,
                                       response_format={"type": "json_object"}, extra_body={"use_beam_search": True})
    assert e.value.body["param"] == "use_beam_search"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, n=11,
                                       extra_body={"use_beam_search": True})
    assert e.value.body["param"] == "n"


def test_grpc_prompt_logprobs_and_best_of(grpc_client, want):
    ids, hf = want["ids"], want["hf"]
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2)
    streamed = None
    for delta in grpc_client.generate_stream(PROMPT, params):
        streamed = merge_delta(streamed, delta)
    for out in (grpc_client.generate(PROMPT, params), streamed):
        plp = out.prompt_logprobs
        assert len(plp) == len(ids) and plp[0] is None
        for p in range(1, len(ids)):
            assert plp[p][ids[p]].logprob == pytest.approx(hf[p - 1, ids[p]], abs=1e-4)
            assert sorted(lp.rank for lp in plp[p].values())[:2] == [1, 2]
    got = grpc_client.generate(PROMPT, SamplingParams(n=2, best_of=4, seed=5, temperature=1.0, max_tokens=6,
                                                      ignore_eos=True))
    assert [c.text for c in got.outputs] == [c.text for c in want["best_of"].outputs]
