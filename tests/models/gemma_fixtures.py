"""Tiny random-weight Gemma 2 / 3 models built with transformers' own config classes (PyTorch),
the oracle of tests/models/test_gemma.py.

Awkward on purpose: head_dim (24) != hidden / heads (16), GQA (4 query heads over 2 kv heads),
odd windows far smaller than the test prompts, query_pre_attn_scalar != head_dim, soft caps
small enough to bite, irregular local/global layouts (a pattern with a remainder, explicit
layer_types that repeat nothing), Gemma 3's global RoPE with linear scaling and its own local
base. Every parameter is random; a norm weight is Gemma's offset from 1 (it scales by 1 + w).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxserve.models.single_sequence import SingleSequenceRunner

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
TEXT = {
    # Even layers local (window 5), odd global; both soft caps on.
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=4, sliding_window=5, query_pre_attn_scalar=20,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=2.0)),
    # Explicit layer_types with no repeating pattern, q/k/v/o biases, untied LM head.
    "gemma2_irregular": ("Gemma2Config", dict(
        num_hidden_layers=5, sliding_window=3, query_pre_attn_scalar=16, attn_logit_softcapping=3.0,
        final_logit_softcapping=None, attention_bias=True, tie_word_embeddings=False,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"])),
    # 5:1 -> here 2:1 local/global over 7 layers (a remainder after the repeated pattern), window 7,
    # a final soft cap, and an attention soft cap that transformers' Gemma 3 never applies.
    "gemma3_text": ("Gemma3TextConfig", dict(
        num_hidden_layers=7, sliding_window=7, sliding_window_pattern=3, rope_parameters=GEMMA3_ROPE,
        query_pre_attn_scalar=32, final_logit_softcapping=2.0, attn_logit_softcapping=1.0)),
}
MODEL_CLASSES = {"Gemma2Config": "Gemma2ForCausalLM", "Gemma3TextConfig": "Gemma3ForCausalLM"}
# The language model inside a Gemma3ForConditionalGeneration, with a one-layer SigLIP tower.
VISION = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, image_size=28, patch_size=14)
NAMES = (*TEXT, "gemma3")
# One prompt length for the full forward passes: every row of a causal forward pass is the last
# row of that prefix's own pass, so one 45-token pass checks prompts of 1 to 45 tokens (windows
# are 3, 5 and 7), and each model compiles few shapes (compiles dominate these tests' time).
LENGTH = 45


def hf_config(name: str):
    if name == "gemma3":
        _, text = TEXT["gemma3_text"]
        config = transformers.Gemma3Config(text_config={**TINY, **text, "model_type": "gemma3_text"},
                                           vision_config=VISION, mm_tokens_per_image=4)
        config.text_config._attn_implementation = "eager"
    else:
        config_cls, extra = TEXT[name]
        config = getattr(transformers, config_cls)(**{**TINY, **extra})
    config._attn_implementation = "eager"
    return config


def make_hf_gemma(name: str, seed: int = 0):
    config = hf_config(name)
    model_cls = "Gemma3ForConditionalGeneration" if name == "gemma3" else MODEL_CLASSES[type(config).__name__]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_((0.3 if "norm" in pname else 0.15) * torch.randn(p.shape, generator=gen))
    return model


def save_hf_gemma(name: str, path: Path, seed: int = 0):
    model = make_hf_gemma(name, seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """name -> (directory of the saved HF model, the PyTorch model), built once per test module
    (a module imports this fixture by name)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            cache[name] = (path, save_hf_gemma(name, path))
        return cache[name]

    return get


def prompt(length: int, seed: int = 0) -> list[int]:
    return np.random.RandomState(seed + length).randint(3, TINY["vocab_size"], size=length).tolist()


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def logits(model, ids) -> np.ndarray:
    """Our logits of every position of `ids` from one paged forward pass."""
    return SingleSequenceRunner(model, max_len=64).full_logits(ids)
