"""Gemma 2 and Gemma 3 through the whole engine, against transformers' greedy generate.

Tiny random models (transformers' own config classes; head_dim != hidden / heads, GQA, windows
of 11 and 13 tokens, smaller than a page and than most prompts, soft caps on, Gemma 3's local
RoPE base and scaled global RoPE). Three target prompts give 32 greedy tokens each, alone and
batched with 32 other requests, under a 32-token step budget (the 70-token prompt is prefilled
in chunks) and a 20-page pool that forces preemption. The global layers read every page, so the
engine must not free pages that slid out of the local layers' window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from engine_fixtures import greedy_generate, hf_oracle, other_requests
from jaxserve import LLM
from jaxserve.core.kv_cache_manager import uniform_sliding_window
from jaxserve.demo_model import train_tokenizer

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
BUDGET = 32  # max_num_batched_tokens: prompts longer than this are prefilled in chunks
TARGETS = [[5, 77, 300, 12, 9], list(range(40, 77)), [(7 * i) % 1000 + 3 for i in range(70)]]
NEW_TOKENS = 32
ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
MODELS = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=4, sliding_window=11, query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
        final_logit_softcapping=2.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=4, sliding_window=13, sliding_window_pattern=3, rope_parameters=ROPE,
        query_pre_attn_scalar=32, final_logit_softcapping=2.0)),
}


def write_gemma(path: Path, name: str, seed: int = 0):
    config_cls, model_cls, extra = MODELS[name]
    tokenizer = train_tokenizer()
    config = getattr(transformers, config_cls)(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"), pad_token_id=tokenizer.pad_token_id, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_((0.3 if "norm" in pname else 0.15) * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


# Gemma 3 (local and global layers in a 2:1 pattern, two RoPEs) in make test; Gemma 2 (alternating
# layers, attention soft caps) is slow: 12 s each, and test_gemma.py checks Gemma 2's logits, greedy
# tokens and chunked prefill against transformers in make test.
@pytest.fixture(scope="module", params=[pytest.param("gemma2", marks=pytest.mark.slow), "gemma3_text"])
def gemma(request, tmp_path_factory):
    """(model dir, HF greedy tokens of the targets, the other requests, their HF greedy tokens)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = write_gemma(path, request.param)
    work = other_requests()
    target_tokens, work_tokens = hf_oracle(hf, TARGETS, NEW_TOKENS, work)
    return path, target_tokens, work, work_tokens


def test_alone_and_batched_with_chunked_prefill_and_preemption_equal_transformers(gemma):
    path, target_tokens, work, work_tokens = gemma
    llm = LLM(str(path), config=CPU, max_model_len=128, max_num_batched_tokens=BUDGET, token_buckets=[16, BUDGET],
              num_pages=20)
    windows = llm.engine.model_config.sliding_windows
    assert None in windows and any(w is not None for w in windows)
    # Mixed local / global layers: no page slides out (the global layers read them all).
    assert uniform_sliding_window(windows) is None and llm.engine.kv.sliding_window is None
    assert max(len(p) for p in TARGETS) > BUDGET > max(w for w in windows if w is not None)
    compiles = llm.stats()["compile_count"]
    for prompt, want in zip(TARGETS, target_tokens):
        assert greedy_generate(llm, [prompt], [NEW_TOKENS]) == [want]
    prompts = [p for p, _ in work[:16]] + TARGETS + [p for p, _ in work[16:]]
    max_tokens = [m for _, m in work[:16]] + [NEW_TOKENS] * len(TARGETS) + [m for _, m in work[16:]]
    outs = greedy_generate(llm, prompts, max_tokens)
    assert outs[16:16 + len(TARGETS)] == target_tokens
    assert outs[:16] + outs[16 + len(TARGETS):] == work_tokens
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert stats["compile_count"] == compiles
