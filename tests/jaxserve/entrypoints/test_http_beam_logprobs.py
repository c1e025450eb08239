"""The OpenAI completions API through the official `openai` client: echo with logprobs and
vLLM's prompt_logprobs (against transformers), on a real server on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from engine_fixtures import write_engine_test_model
from http_helpers import CPU, MODEL, ServerThread, base_url
from jaxserve import AsyncLLM, LLM, SamplingParams

PROMPT = "The capital of France is a city of many rivers and bridges"


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
    return w


@pytest.fixture(scope="module")
def client(llm, want):
    engine = AsyncLLM(engine=llm.engine, model_name=MODEL)
    st = ServerThread()
    frontend = st.serve(engine)
    yield openai.OpenAI(base_url=base_url(frontend) + "/v1", api_key="unused", max_retries=0)
    st.close()
    engine.shutdown()


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
