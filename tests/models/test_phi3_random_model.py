"""scripts/make_random_model.py's Phi-3 shapes: the fused tensors it writes load in transformers
and in jaxserve with equal logits, and the phi3-mini preset is a config both accept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxserve.models.config import ModelConfig
from jaxserve.models.loader import load_model
from jaxserve.models.single_sequence import SingleSequenceRunner

SCRIPT = Path(__file__).parents[2] / "scripts" / "make_random_model.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_random_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phi3_mini_preset_is_phi3_mini_128k_shaped(script):
    d, f, layers, heads, kv, vocab, theta, max_pos = script.PRESETS["phi3-mini"]
    fields = dict(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max_pos, pad_token_id=0,
                  **{k: v for k, v in script.PHI3_CONFIGS["phi3-mini"].items() if k not in ("architectures",
                                                                                           "model_type")})
    cfg = ModelConfig.from_hf(transformers.Phi3Config(**fields).to_dict())
    assert (cfg.model_type, cfg.head_dim, cfg.rope.rotary_dim(cfg.head_dim)) == ("phi3", 96, 96)
    assert cfg.rope.long_context_threshold == 4096 and cfg.rope.factor == 32.0
    assert len(cfg.rope.long_factor) == 48 and cfg.sliding_windows == (None,) * 32  # 262144 covers 131072
    assert 3.7e9 < cfg.num_params < 3.9e9


def test_written_phi3_loads_in_transformers_and_jaxserve(script, tmp_path, monkeypatch):
    """A tiny preset through the same writer: safetensors with fused qkv / gate_up and LongRoPE."""
    monkeypatch.setitem(script.PRESETS, "phi3-tiny", (64, 96, 2, 4, 2, 1024, 10000.0, 256))
    monkeypatch.setitem(script.PHI3_CONFIGS, "phi3-tiny", {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "original_max_position_embeddings": 32,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                            "short_factor": [1.0, 1.5, 2.0, 1.0, 1.2, 1.8, 2.5, 3.0],
                            "long_factor": [2.0, 4.0, 2.0, 4.0, 6.0, 9.0, 12.0, 16.0]}})
    path = script.write("phi3-tiny", tmp_path / "phi3", "float32", seed=0)
    hf = transformers.Phi3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    runner = SingleSequenceRunner(load_model(path).model, max_len=64)
    for length in (20, 40):  # short and long factors
        ids = np.random.RandomState(length).randint(3, 1000, size=length).tolist()
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        got = runner.full_logits(ids)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), length
