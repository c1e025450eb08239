"""A Phi-3 with LongRoPE (original context 32, max 256), partial rotary 0.75, GQA and a sliding
window through the whole engine, against transformers' cached greedy decode.

Prompts below, at and past the original context, decoding across it: each gets transformers'
tokens alone, batched with 32 other requests, and with chunked prefill and preemption forced by
a small page pool and a 32-token step budget (the long prompts' chunks then have context lengths
below 32 while the prompt is longer: they must still take the long factors). Prefix caching keeps
the pages of prompts past the original context apart from the others (their KV differs).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

from jaxserve import LLM, SamplingParams
from jaxserve.demo_model import train_tokenizer

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
GREEDY = dict(temperature=0.0, ignore_eos=True)
ORIGINAL = 32
# (prompt length, max_tokens): short prompts that decode past 32, prompts at 32, past it, long.
TARGETS = [(3, 32), (17, 32), (30, 32), (32, 32), (33, 32), (45, 32), (100, 32)]


def write_phi3(path: Path, seed: int = 0):
    tokenizer = train_tokenizer()
    config = transformers.Phi3Config(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=ORIGINAL,
        partial_rotary_factor=0.75, sliding_window=41, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.3, 1.9, 2.4, 3.1, 4.0],
                         "long_factor": [1.5, 2.5, 4.0, 7.0, 11.0, 16.0]},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.15
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def hf_cached_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' cached decode: the prompt in one forward, then one token a step (its
    generate would instead re-encode a sequence that decodes past the original context)."""
    tokens: list[int] = []
    with torch.no_grad():
        res = model(input_ids=torch.tensor([prompt]), cache=DynamicCache(config=model.config), use_cache=True)
        while True:
            tokens.append(int(res.logits[0, -1].argmax()))
            if len(tokens) == max_new_tokens:
                return tokens
            pos = torch.tensor([[len(prompt) + len(tokens) - 1]])
            res = model(input_ids=torch.tensor([tokens[-1:]]), position_ids=pos, cache=res.cache, use_cache=True)


def workload(seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    targets = [([rng.randrange(6, 1000) for _ in range(n)], m) for n, m in TARGETS]
    others = [([rng.randrange(6, 1000) for _ in range(rng.choice([1, 5, 20, 31, 34, 60]))], rng.randrange(1, 24))
              for _ in range(32)]
    return targets + others


def run(llm: LLM, work) -> list[list[int]]:
    outs = llm.generate([p for p, _ in work], [SamplingParams(max_tokens=m, **GREEDY) for _, m in work],
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3-engine")
    hf = write_phi3(path)
    work = workload()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only contend
    try:
        want = [hf_cached_greedy(hf, p, m) for p, m in work]
    finally:
        torch.set_num_threads(threads)
    return path, hf, work, want


@pytest.fixture(scope="module")
def llm(phi3):
    return LLM(str(phi3[0]), config=CPU)


def test_alone_and_batched_with_32_others_equal_transformers(llm, phi3):
    _, _, work, want = phi3
    compiled = llm.stats()["compile_count"]
    targets = len(TARGETS)
    assert [run(llm, [w])[0] for w in work[:targets]] == want[:targets]
    assert run(llm, work) == want
    stats = llm.stats()
    assert stats["compile_count"] == compiled  # which factors a token takes is data, not a shape
    assert stats["num_free_pages"] == stats["num_total_pages"] or llm.engine.config.enable_prefix_caching


def test_chunked_prefill_and_preemption_change_nothing(phi3):
    path, _, work, want = phi3
    small = LLM(str(path), config=CPU, num_pages=12, max_num_batched_tokens=32, enable_prefix_caching=False)
    assert run(small, work) == want
    stats = small.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_prefix_cache_keeps_long_prompts_apart(llm, phi3):
    """A 24-token prompt caches its first page (short factors). A 28-token prompt with that
    prefix reuses it; a 44-token prompt with that prefix is past the original context, so its
    KV takes the long factors everywhere and it must not reuse the page; both equal transformers."""
    _, hf, _, _ = phi3
    rng = random.Random(11)
    prefix = [rng.randrange(6, 1000) for _ in range(24)]
    short, longer = prefix + [7, 8, 9, 10], prefix + [rng.randrange(6, 1000) for _ in range(20)]
    run(llm, [(prefix, 2)])
    outs = llm.generate([short, longer], SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [16, 0]
    assert [o.outputs[0].token_ids for o in outs] == [hf_cached_greedy(hf, short, 8), hf_cached_greedy(hf, longer, 8)]
