"""Mixtral and Qwen3-MoE through the whole engine, against transformers' greedy generate.

Tiny random models (top-2 of 4 experts; top-8 of 16, renormalised; head_dim != hidden / heads,
GQA). Three target prompts give 32 greedy tokens each, alone and batched with 32 other
requests, under a 32-token step budget (the 70-token prompt is prefilled in chunks) and a
20-page pool that forces preemption. The experts' loads change every step (different tokens,
different batch mixes) and nothing compiles after warm-up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_fixtures import greedy_generate, hf_oracle, other_requests
from jaxserve import LLM
from moe_engine_fixtures import MOE_MODELS, write_moe_engine_model

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
BUDGET = 32  # max_num_batched_tokens: prompts longer than this are prefilled in chunks
TARGETS = [[5, 77, 300, 12, 9], list(range(40, 77)), [(7 * i) % 1000 + 3 for i in range(70)]]
NEW_TOKENS = 32


# Qwen3-MoE (top-8 of 16, renormalised) in make test; Mixtral is slow: 10 s each, and test_moe.py checks
# Mixtral's logits and greedy tokens against transformers in make test.
@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.slow] if name == "mixtral" else [])
                                        for name in sorted(MOE_MODELS)])
def moe(request, tmp_path_factory):
    """(model dir, HF greedy tokens of the targets, the other requests, their HF greedy tokens)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = write_moe_engine_model(path, request.param)
    work = other_requests()
    target_tokens, work_tokens = hf_oracle(hf, TARGETS, NEW_TOKENS, work)
    return path, target_tokens, work, work_tokens


def test_alone_and_batched_with_chunked_prefill_and_preemption_equal_transformers(moe):
    path, target_tokens, work, work_tokens = moe
    llm = LLM(str(path), config=CPU, max_model_len=128, max_num_batched_tokens=BUDGET, token_buckets=[16, BUDGET],
              num_pages=20)
    assert llm.engine.model_config.num_experts in (4, 16)
    assert max(len(p) for p in TARGETS) > BUDGET
    compiles = llm.stats()["compile_count"]
    assert compiles == len(llm.engine.runner.shapes_to_compile())
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
    assert stats["compile_count"] == compiles  # every routing ran a program compiled at warm-up
