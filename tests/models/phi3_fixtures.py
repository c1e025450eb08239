"""Tiny random-weight transformers Phi-3 models (Phi3Config, Phi3ForCausalLM) with awkward shapes,
and transformers' own cached greedy decode as the oracle for LongRoPE past the original context.

Every parameter is drawn at random (norm weights too), so a fused row block split in the wrong
place changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import DynamicCache

from hf_fixtures import random_hf_model

ORIGINAL = 32  # original_max_position_embeddings of the LongRoPE models: prompts past it take long factors
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# rotary_dim 12 (head_dim 16 x 0.75): 6 factors each, long ones far from the short ones.
SHORT = [1.0, 1.3, 1.9, 2.4, 3.1, 4.0]
LONG = [1.5, 2.5, 4.0, 7.0, 11.0, 16.0]


def longrope(**extra) -> dict:
    return dict(original_max_position_embeddings=ORIGINAL, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG, **extra})


PHI3 = {
    # head_dim 24 != hidden / heads (16), GQA 4:2, 18 of 24 dims rotate, an odd window of 9 on every layer.
    "phi3_window": dict(num_key_value_heads=2, head_dim=24, partial_rotary_factor=0.75, sliding_window=9),
    # LongRoPE 32 -> 256 (factor 8 from the ratio: attention factor sqrt(1 + ln 8 / ln 32)), partial
    # rotary 0.75, one kv head, tied embeddings (Phi-4-mini's form).
    "phi3_longrope": dict(num_key_value_heads=1, partial_rotary_factor=0.75, tie_word_embeddings=True, **longrope()),
}


def make_phi3(fields: dict, seed: int = 0) -> transformers.Phi3ForCausalLM:
    return random_hf_model("Phi3Config", "Phi3ForCausalLM", {**BASE, **fields}, seed)


def save_phi3(name_or_fields: str | dict, path: Path, seed: int = 0) -> transformers.Phi3ForCausalLM:
    fields = PHI3[name_or_fields] if isinstance(name_or_fields, str) else name_or_fields
    model = make_phi3(fields, seed)
    model.save_pretrained(path)
    return model


def hf_full_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_cached_steps(model, prompt: list[int], steps: list[int]) -> list[np.ndarray]:
    """transformers' cached decode: the prompt in one forward, then `steps` one token at a
    time through its KV cache. Returns the logits [V] after the prompt and after each step."""
    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        res = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        out.append(res.logits[0, -1].float().numpy())
        for i, token in enumerate(steps):
            pos = len(prompt) + i
            res = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]), cache=res.cache,
                        use_cache=True)
            out.append(res.logits[0, -1].float().numpy())
    return out


def hf_cached_greedy(model, prompt: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
    """Greedy tokens from transformers' cached decode (prompt forward, then one token a step),
    stopping at EOS. Equals `generate` except where generate re-encodes a sequence that decodes
    past original_max_position_embeddings (see models.rope)."""
    cache = DynamicCache(config=model.config)
    tokens: list[int] = []
    with torch.no_grad():
        res = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        while True:
            token = int(res.logits[0, -1].argmax())
            tokens.append(token)
            if token in eos_ids or len(tokens) == max_new_tokens:
                return tokens
            pos = len(prompt) + len(tokens) - 1
            res = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]), cache=res.cache,
                        use_cache=True)
