"""The engine against transformers and against itself: concurrency, preemption, prefix
caching, copy-on-write n > 1, seeded sampling, no recompiles, bad input."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_fixtures import hf_greedy, write_engine_test_model
from jaxserve import LLM, SamplingParams

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-model")
    hf, tok = write_engine_test_model(path)
    return path, hf, tok


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir[0]), config=CPU)


def mixed_workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(6, 1000) for _ in range(rng.choice([1, 3, 9, 17, 30, 64, 100, 150]))],
             rng.randrange(1, 24)) for _ in range(n)]


def run(llm: LLM, work, **params) -> list[list[int]]:
    outs = llm.generate([p for p, _ in work], [SamplingParams(max_tokens=m, **{**GREEDY, **params}) for _, m in work],
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def alone(llm):
    """Our greedy output for each request of the mixed workload when it runs by itself."""
    work = mixed_workload(64)
    return work, [run(llm, [w])[0] for w in work]


def test_concurrent_equals_alone_and_transformers(llm, model_dir, alone):
    _, hf, _ = model_dir
    work, solo = alone
    together = run(llm, work)
    assert together == solo
    for (prompt, max_tokens), ours in zip(work, together):
        assert ours == hf_greedy(hf, prompt, max_tokens)
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_preemption_changes_no_output(model_dir, alone):
    work, solo = alone
    small = LLM(str(model_dir[0]), config=CPU, num_pages=24, enable_prefix_caching=False)
    assert run(small, work) == solo
    stats = small.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_warm_up_compiles_every_bucket_and_nothing_after(llm, alone):
    programs = llm.engine.runner.shapes_to_compile()
    assert llm.stats()["compile_count"] == len(programs)
    work, _ = alone
    rng = random.Random(1)
    params = [SamplingParams(max_tokens=m, temperature=rng.choice([0.0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.9]),
                             top_k=rng.choice([0, 5]), min_p=rng.choice([0.0, 0.05]),
                             repetition_penalty=rng.choice([1.0, 1.2]), presence_penalty=rng.choice([0.0, 0.5]),
                             logprobs=rng.choice([None, 3]), n=rng.choice([1, 1, 2]), seed=rng.choice([None, 7]),
                             stop=rng.choice([None, ["e"]]), min_tokens=rng.choice([0, min(2, m)]))
              for _, m in work]
    llm.generate([p for p, _ in work], params, use_tqdm=False)
    assert llm.stats()["compile_count"] == len(programs)


def test_prefix_cache_computes_only_new_tokens(llm):
    rng = random.Random(5)
    prefix = [rng.randrange(6, 1000) for _ in range(100)]
    first, second = prefix + [11, 12, 13], prefix + [21, 22, 23, 24, 25]
    engine = llm.engine
    run(llm, [(first, 4)])
    hits, computed = engine.kv.prefix_cache_hit_tokens, engine.num_computed_tokens
    out = llm.generate([second], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)[0]
    assert out.num_cached_tokens == 96  # six full pages of 16
    assert engine.kv.prefix_cache_hit_tokens - hits == 96
    # computed: the 9 uncached prompt tokens, then one per decode step after the first token
    assert engine.num_computed_tokens - computed == len(second) - 96 + 3
    cold = LLM(str(Path(engine.model_path)), config=CPU, enable_prefix_caching=False)
    assert out.outputs[0].token_ids == run(cold, [(second, 4)])[0]


def test_seeded_sampling_reproducible_across_batches(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = [7, 8, 9, 10, 11]
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [([random.Random(i).randrange(6, 1000) for _ in range(5 + 7 * i)],
               SamplingParams(max_tokens=9, temperature=0.9)) for i in range(6)]
    batch = llm.generate([o[0] for o in others[:3]] + [prompt] + [o[0] for o in others[3:]],
                         [o[1] for o in others[:3]] + [params] + [o[1] for o in others[3:]], use_tqdm=False)
    assert batch[3].outputs[0].token_ids == alone
    unseeded = llm.generate([prompt] * 2, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True),
                            use_tqdm=False)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_n_samples_share_prompt_pages_copy_on_write(llm):
    engine = llm.engine
    prompt = [random.Random(9).randrange(6, 1000) for _ in range(70)]  # 4 full pages + 6 tokens
    free0 = engine.kv.num_free_pages
    engine.add_request("cow", prompt, SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True))
    while engine.num_computed_tokens == 0 or len(engine.scheduler.running) < 4:
        engine.step()
    assert free0 - engine.kv.num_free_pages == 5  # four samples, one copy of the prompt's pages
    engine.step()  # each sample writes into the shared partial page: three copy it
    assert free0 - engine.kv.num_free_pages == 8
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_free_pages == free0
    samples = llm.generate([prompt], SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True),
                           use_tqdm=False)[0].outputs
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert len({tuple(s.token_ids) for s in samples}) == 4
    greedy = llm.generate([prompt], SamplingParams(n=3, max_tokens=10, **GREEDY), use_tqdm=False)[0].outputs
    single = run(llm, [(prompt, 10)])[0]
    assert [s.token_ids for s in greedy] == [single] * 3  # the copied pages hold the prompt's KV


@pytest.mark.parametrize("prompt, params, message", [
    ("", SamplingParams(), "prompt must not be empty"),
    ([], SamplingParams(), "prompt"),
    ([5] * 600, SamplingParams(max_tokens=1), "max_model_len is 512"),
    ([5] * 500, SamplingParams(max_tokens=20), "max_tokens must be <= 12"),
    ([5, 1024], SamplingParams(), r"prompt_token_ids must be in \[0, 1024\)"),
    ([5, -1], SamplingParams(), "prompt_token_ids"),
    ([5], SamplingParams(stop_token_ids=[5000]), "stop_token_ids"),
    ([5], SamplingParams(logit_bias={4096: 1.0}), "logit_bias"),
    ([5], SamplingParams(n=17), "n must be <= 16"),
])
def test_bad_requests_rejected_and_engine_keeps_serving(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[6, 7, 8], prompt], params, use_tqdm=False)
    stats = llm.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_pages"] == stats["num_total_pages"] or llm.engine.config.enable_prefix_caching
    assert len(llm.generate([[6, 7, 8]], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
                                          ("max_tokens", 0), ("n", 0), ("logprobs", 21), ("presence_penalty", 3.0)])
def test_out_of_range_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_conditions_and_logprobs(llm, model_dir):
    _, _, tok = model_dir
    prompt = [9, 10, 11, 12]
    base = run(llm, [(prompt, 16)])[0]
    stop_id = base[5]
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    first = base.index(stop_id)
    assert out.token_ids == base[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop_id],
                                                min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and out.token_ids[first] != stop_id
    full_text = tok.decode(base, skip_special_tokens=True)
    stop_str = full_text[len(full_text) // 2:][:3]
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, stop=[stop_str], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_str
    assert out.text == full_text[:full_text.index(stop_str)]
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    _, hf, _ = model_dir
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1].double()
    oracle = torch.log_softmax(logits, dim=-1).numpy()
    for row, token, entry in zip(oracle, out.token_ids, out.logprobs):
        top3 = np.argsort(-row)[:3].tolist()
        assert [t for t, v in sorted(entry.items(), key=lambda kv: kv[1].rank)] == top3
        assert entry[token].rank == 1  # greedy: the sampled token is the top one
        for t, v in entry.items():
            assert abs(v.logprob - row[t]) < 1e-4


def test_chat_renders_the_template_and_generates(llm, model_dir):
    _, _, tok = model_dir
    messages = [{"role": "user", "content": "Hi there"}]
    params = SamplingParams(max_tokens=5, **GREEDY)
    out = llm.chat(messages, params, use_tqdm=False)[0]
    want_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)
    assert out.prompt_token_ids == want_ids and want_ids[0] == tok.bos_token_id and want_ids.count(want_ids[0]) == 1
    assert out.outputs[0].token_ids == run(llm, [(want_ids, 5)])[0]
    two = llm.chat([messages, messages + [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]],
                   params, use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids
    from jaxserve.engine.chat import ChatTemplateError

    with pytest.raises(ChatTemplateError, match="could not be rendered"):
        llm.chat(messages, params, chat_template="{{ raise_exception('nope') }}", use_tqdm=False)


def test_stop_string_ending_mid_batch_leaves_the_others_exact(llm, model_dir):
    """A stop string is found while the next step already runs: the request's extra token is
    dropped and every other request of the batch is unaffected."""
    _, _, tok = model_dir
    work = mixed_workload(12, seed=3)
    solo = [run(llm, [w])[0] for w in work]
    target = max(range(len(work)), key=lambda i: len(solo[i]))
    text = tok.decode(solo[target], skip_special_tokens=True)
    stop = text[len(text) // 3:][:2]
    params = [SamplingParams(max_tokens=m, **GREEDY, **({"stop": [stop]} if i == target else {}))
              for i, (_, m) in enumerate(work)]
    outs = llm.generate([p for p, _ in work], params, use_tqdm=False)
    for i, o in enumerate(outs):
        if i != target:
            assert o.outputs[0].token_ids == solo[i]
    hit = outs[target].outputs[0]
    assert hit.finish_reason == "stop" and hit.stop_reason == stop and hit.text == text[:text.index(stop)]
    assert solo[target][:len(hit.token_ids)] == hit.token_ids and len(hit.token_ids) < len(solo[target])
    assert llm.stats()["num_running"] == 0


def test_lora_request_needs_enable_lora(llm, tmp_path):
    from jaxserve import LoRARequest

    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.generate([[1, 2]], lora_request=LoRARequest("a", 1, str(tmp_path)))
    assert llm.stats()["num_waiting"] == 0 and "lora_loaded" not in llm.stats()
