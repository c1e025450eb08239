"""Gemma 2 / 3 against transformers (PyTorch) on the same random weights: logits, greedy tokens,
chunked prefill, the per-layer window and RoPE, the soft caps, the module structure.
Config forms, refusals and loading are in test_gemma_loading.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flax import nnx

from gemma_fixtures import LENGTH, NAMES, gemma, hf_logits, logits, prompt, rel_err  # noqa: F401 (fixture)
from jaxserve.models.decoder import CausalLM
from jaxserve.models.loader import load_model
from jaxserve.models.single_sequence import SingleSequenceRunner


def with_config(model: CausalLM, **changes) -> CausalLM:
    """The same parameters under a config with `changes` (what the negative controls change)."""
    cfg = dataclasses.replace(model.cfg, **changes)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(cfg)))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, gemma):
    path, hf = gemma(name)
    ids = prompt(LENGTH)
    ours, ref = logits(load_model(path).model, ids), hf_logits(hf, ids)
    for row in range(LENGTH):  # each prefix's logits, relative to that prefix's scale
        assert rel_err(ours[row], ref[row]) <= 1e-4, (name, row)


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "gemma3"])
def test_greedy_tokens_match_transformers(name, gemma):
    path, hf = gemma(name)
    ids = prompt(13, seed=1)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert SingleSequenceRunner(load_model(path).model, max_len=64).greedy(ids, 32) == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_chunked_prefill_then_decode_equals_full_forward(name, gemma):
    """15 prompt tokens in chunks of 5 (crossing a page and the windows), then one at a time."""
    path, _ = gemma(name)
    model = load_model(path).model
    ids = prompt(LENGTH)
    full = logits(model, ids)
    runner = SingleSequenceRunner(model, max_len=64)
    rows = [runner.run(ids[s:s + 5], s) for s in range(0, 15, 5)]
    rows += [runner.run([ids[pos]], pos) for pos in range(15, LENGTH)]
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("name", [pytest.param("gemma2", marks=pytest.mark.slow), "gemma2_irregular", "gemma3_text"])
def test_each_layer_attends_through_its_own_window(name, gemma):
    """The parity above holds with the per-layer windows (the 45-token prompt is 6 to 15 windows
    long) and fails by far when the local and global layers swap windows (each keeping its RoPE:
    Gemma 3's ropes swap too) or when the local layers' window is wider than the prompt."""
    path, hf = gemma(name)
    loaded = load_model(path)
    cfg = loaded.config
    ids = prompt(LENGTH)
    ref = hf_logits(hf, ids)
    windows = cfg.sliding_windows
    window = next(w for w in windows if w is not None)
    assert None in windows and window < len(ids)
    assert rel_err(logits(loaded.model, ids), ref) <= 1e-4
    swapped = tuple(window if w is None else None for w in windows)
    ropes = {"rope": cfg.sliding_rope, "sliding_rope": cfg.rope} if cfg.sliding_rope is not None else {}
    assert rel_err(logits(with_config(loaded.model, sliding_windows=swapped, **ropes), ids), ref) > 1e-2
    wide = tuple(None if w is None else LENGTH + 1 for w in windows)
    assert rel_err(logits(with_config(loaded.model, sliding_windows=wide), ids), ref) > 1e-2


def test_gemma3_local_layers_use_their_own_rope(gemma):
    path, hf = gemma("gemma3_text")
    loaded = load_model(path)
    cfg = loaded.config
    assert cfg.rope.rope_type == "linear" and cfg.rope.factor == 8.0 and cfg.rope.theta == 1e6
    assert cfg.sliding_rope.rope_type == "default" and cfg.sliding_rope.theta == 1e4
    ids = prompt(LENGTH)
    ref = hf_logits(hf, ids)
    for changes in ({"sliding_rope": None}, {"rope": cfg.sliding_rope}):
        assert rel_err(logits(with_config(loaded.model, **changes), ids), ref) > 1e-2, changes


def test_soft_caps_are_applied(gemma):
    path, hf = gemma("gemma2")
    loaded = load_model(path)
    assert loaded.config.attn_logit_softcap == 2.0 and loaded.config.final_logit_softcap == 2.0
    ids = prompt(LENGTH)
    ref = hf_logits(hf, ids)
    assert np.abs(ref).max() < 2.0
    for changes in ({"attn_logit_softcap": None}, {"final_logit_softcap": None}):
        assert rel_err(logits(with_config(loaded.model, **changes), ids), ref) > 1e-2, changes


def test_gemma3_follows_transformers_on_the_soft_caps(gemma):
    """Gemma3Attention never passes attn_logit_softcapping on; Gemma3ForCausalLM caps the final
    logits and Gemma3ForConditionalGeneration does not (transformers 5)."""
    text = load_model(gemma("gemma3_text")[0]).config
    nested = load_model(gemma("gemma3")[0]).config
    assert text.attn_logit_softcap is None and text.final_logit_softcap == 2.0
    assert nested.attn_logit_softcap is None and nested.final_logit_softcap is None
    assert dataclasses.replace(nested, model_type="gemma3_text", final_logit_softcap=2.0) == text


def test_gemma_layers_and_norms_carry_logical_axes(gemma):
    """The decoder builds Gemma's layer (sandwich norms) and norms from the flag, and every
    parameter names its logical axes (the layers axis first inside the scanned stack)."""
    from jaxserve.models.gemma import GemmaDecoderLayer, GemmaRMSNorm

    cfg = load_model(gemma("gemma3_text")[0]).config
    model = nnx.eval_shape(lambda: CausalLM(cfg))
    assert isinstance(model.layers, GemmaDecoderLayer) and isinstance(model.norm, GemmaRMSNorm)
    assert isinstance(model.layers.self_attn.q_norm, GemmaRMSNorm)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.get_value().ndim and (path[0] != "layers" or axes[0] == "layers"), path
    names = {p[0] for p, _ in nnx.to_flat_state(nnx.state(model.layers, nnx.Param))}
    assert {"pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_layernorm"} <= names
