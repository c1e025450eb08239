"""Multi-LoRA in the engine (issue 18): greedy tokens against transformers + peft for three
adapters of different ranks and target modules, alone and mixed with base-model requests in one
batch of 32; the prefix cache keyed by adapter; LRU eviction with waiting requests; no compiles
after warm-up; adapter refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from engine_fixtures import GREEDY, hf_greedy, other_requests, write_engine_test_model  # noqa: E402
from lora_fixtures import ADAPTERS, write_adapters  # noqa: E402
from jaxserve import LLM, LoRARequest, SamplingParams  # noqa: E402

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
BATCH = dict(max_num_seqs=32, max_num_batched_tokens=256, token_buckets=[32, 256], seq_buckets=[4, 32])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    hf, _ = write_engine_test_model(root / "base")
    adapters = write_adapters(root / "base", root)
    loras = {name: LoRARequest(name, i, str(d)) for i, (name, (d, _)) in enumerate(adapters.items(), start=1)}
    return root / "base", hf, adapters, loras


@pytest.fixture(scope="module")
def llm(setup):
    return LLM(str(setup[0]), config=CPU, enable_lora=True, max_loras=3, max_lora_rank=16, **BATCH)


def greedy(llm, prompts, max_tokens, loras):
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]


def mixed_batch(loras):
    """32 requests cycling base, alpha, beta, gamma: (prompt, max_tokens, LoRARequest or None)."""
    names = [None, *ADAPTERS]
    return [(p, m, None if names[i % 4] is None else loras[names[i % 4]])
            for i, (p, m) in enumerate(other_requests(32, seed=3))]


@pytest.fixture(scope="module")
def alone(llm, setup):
    work = mixed_batch(setup[3])
    return work, [greedy(llm, [p], [m], [lora])[0] for p, m, lora in work]


def test_each_adapter_matches_peft(llm, setup):
    _, hf, adapters, loras = setup
    prompts = [[7, 99, 301, 45, 12], list(range(40, 83))]
    base = [hf_greedy(hf, p, 12) for p in prompts]
    assert greedy(llm, prompts, [12, 12], None) == base
    for name, (_, peft_model) in adapters.items():
        want = [hf_greedy(peft_model, p, 12) for p in prompts]
        assert want != base, name  # the adapter changes the greedy tokens: the check can fail
        assert greedy(llm, prompts, [12, 12], loras[name]) == want, name


def test_mixed_batch_of_32_equals_alone_and_peft(llm, setup, alone):
    _, hf, adapters, _ = setup
    work, solo = alone
    assert greedy(llm, [p for p, _, _ in work], [m for _, m, _ in work], [lora for _, _, lora in work]) == solo
    oracle = {None: hf, **{name: model for name, (_, model) in adapters.items()}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend
    try:
        for (prompt, m, lora), ours in zip(work, solo):
            assert ours == hf_greedy(oracle[lora.lora_name if lora else None], prompt, m)
    finally:
        torch.set_num_threads(threads)
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert stats["lora_pinned"] == 0


def test_no_compiles_after_warm_up(llm, setup, alone):
    programs = llm.engine.runner.shapes_to_compile()
    assert ("lora_write", 1) in programs
    assert llm.stats()["compile_count"] == len(programs)
    work, _ = alone
    llm.generate([p for p, _, _ in work], SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, n=2),
                 use_tqdm=False, lora_request=[lora for _, _, lora in work])
    assert llm.engine.remove_lora(setup[3]["gamma"].lora_int_id)  # unload, then load again
    greedy(llm, [[5, 6, 7]], [3], setup[3]["gamma"])
    assert llm.stats()["compile_count"] == len(programs)


def test_prefix_cache_is_keyed_by_adapter(llm, setup):
    loras = setup[3]
    prompt = list(range(100, 164))  # 4 full pages
    engine = llm.engine

    def hits(lora):
        before = engine.kv.prefix_cache_hit_tokens
        greedy(llm, [prompt], [2], lora)
        return engine.kv.prefix_cache_hit_tokens - before

    assert hits(loras["alpha"]) == 0
    assert hits(loras["beta"]) == 0  # the same prompt under another adapter shares no pages
    assert hits(None) == 0  # nor with the base model
    assert hits(loras["alpha"]) == 48  # under one adapter it hits (the last page is recomputed)
    assert hits(None) == 48


def test_lru_eviction_waits_and_changes_no_output(setup, alone):
    work, solo = alone
    one = LLM(str(setup[0]), config=CPU, enable_lora=True, max_loras=1, max_lora_rank=16, **BATCH)
    programs = len(one.engine.runner.shapes_to_compile())
    got = greedy(one, [p for p, _, _ in work], [m for _, m, _ in work], [lora for _, _, lora in work])
    assert got == solo  # three adapters through one slot: requests waited for it, none failed
    stats = one.stats()
    assert stats["lora_evictions"] >= 2 and stats["lora_loaded"] == 1
    assert stats["compile_count"] == programs
    # unloading an adapter with a request in flight is refused, and allowed once it finished
    lora = setup[3]["alpha"]
    one.engine.add_request("busy", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY), lora_request=lora)
    with pytest.raises(ValueError, match="unfinished requests"):
        one.engine.remove_lora(lora.lora_int_id)
    while one.engine.has_unfinished_requests():
        one.engine.step()
    assert one.engine.remove_lora(lora.lora_int_id) and lora.lora_int_id not in one.engine.list_loras()
    assert not one.engine.remove_lora(lora.lora_int_id)


def test_bad_adapters_are_refused(llm, setup, tmp_path):
    import json

    loras = setup[3]
    gamma_dir = Path(loras["gamma"].lora_path)
    cfg = json.loads((gamma_dir / "adapter_config.json").read_text())
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_model.safetensors").write_bytes((gamma_dir / "adapter_model.safetensors").read_bytes())
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 32}))
    with pytest.raises(ValueError, match="max_lora_rank=16"):
        llm.generate([[1, 2]], lora_request=LoRARequest("big", 79, str(big)))
    with pytest.raises(ValueError, match="already adapter 'alpha'"):
        llm.generate([[1, 2]], lora_request=LoRARequest("other", loras["alpha"].lora_int_id, str(gamma_dir)))
    with pytest.raises(ValueError, match="no-such-dir"):
        llm.generate([[1, 2]], lora_request=LoRARequest("missing", 77, str(tmp_path / "no-such-dir")))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_model.safetensors").write_bytes((gamma_dir / "adapter_model.safetensors").read_bytes())
    (wrong / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="do not match the base model"):
        llm.generate([[1, 2]], lora_request=LoRARequest("wrong", 78, str(wrong)))
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, "/tmp")
    with pytest.raises(ValueError, match="max_loras"):
        LLM(str(setup[0]), config=CPU, enable_lora=True, max_loras=0)
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        llm.generate([[1, 2]], lora_request=[None, None])
