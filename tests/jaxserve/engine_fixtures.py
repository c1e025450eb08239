"""A tiny random-weight HF Llama with the demo tokenizer: the engine tests' model, whose
PyTorch twin is the oracle for greedy tokens."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers

from jaxserve.demo_model import train_tokenizer

VOCAB = 1024
MAX_LEN = 512


def write_engine_test_model(path: Path, seed: int = 0, num_heads: int = 4, head_dim: int | None = None):
    """head_dim None: hidden_size / num_heads (16 here); set it for real-shaped heads (e.g. 128)."""
    tokenizer = train_tokenizer()
    assert len(tokenizer) <= VOCAB
    eos = [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=num_heads,
        num_key_value_heads=2, head_dim=head_dim or 64 // num_heads, max_position_embeddings=MAX_LEN,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.15
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
    """Greedy tokens from transformers for one prompt alone, stopping at EOS like we do."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(eos_ids) or None, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


GREEDY = dict(temperature=0.0, ignore_eos=True)


def other_requests(n: int = 32, seed: int = 0, vocab: int = 1000) -> list[tuple[list[int], int]]:
    """n (prompt ids, max_tokens) pairs of mixed lengths (1-64 prompt tokens, 1-23 new), the
    requests a family's engine test batches its targets with."""
    rng = random.Random(seed)
    return [([rng.randrange(6, vocab) for _ in range(rng.choice([1, 4, 9, 17, 30, 45, 64]))], rng.randrange(1, 24))
            for _ in range(n)]


def hf_oracle(model, targets: list[list[int]], new_tokens: int, work: list[tuple[list[int], int]]):
    """transformers' greedy tokens of every target prompt (new_tokens each) and of every
    request of `work`, one request at a time on one thread (a tiny model: more only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [hf_greedy(model, p, new_tokens) for p in targets], [hf_greedy(model, p, m) for p, m in work]
    finally:
        torch.set_num_threads(threads)


def greedy_generate(llm, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """The engine's greedy tokens (EOS ignored) for each prompt, one batch."""
    from jaxserve import SamplingParams

    params = [SamplingParams(max_tokens=m, **GREEDY) for m in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
