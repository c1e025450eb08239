"""Phi-3 (Phi3ForCausalLM) against transformers on the same random weights: fused qkv / gate_up
split at load, LongRoPE short and long factors (a tiny original context of 32), partial rotary,
head_dim != hidden / heads, GQA, a sliding window; the registry's refusals; Orbax conversion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxserve.models.config import ModelConfig, ModelConfigError, ModelLoadError
from jaxserve.models.hf_weights import split_fused
from jaxserve.models.loader import load_model
from jaxserve.models.orbax_checkpoint import convert
from jaxserve.models.rope import RopeConfig, inverse_frequencies
from jaxserve.models.single_sequence import SingleSequenceRunner
from phi3_fixtures import BASE, LONG, ORIGINAL, PHI3, SHORT, hf_cached_greedy, hf_cached_steps, hf_full_logits, \
    longrope, save_phi3

# Prompt lengths per model (each length compiles once; later tests reuse these shapes).
PROMPT_LENGTHS = {"phi3_window": (7, 45), "phi3_longrope": (20, ORIGINAL, ORIGINAL + 1, 100)}
MAX_LEN = 160


def prompt(length: int, seed: int = 0) -> list[int]:
    return np.random.RandomState(seed + length).randint(3, 97, size=length).tolist()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """name -> (HF directory, PyTorch model, our loaded model), each built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            hf = save_phi3(name, path)
            cache[name] = (path, hf, load_model(path).model)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(PHI3))
def test_logits_match_transformers(name, phi3):
    """A prompt forward; with LongRoPE, prompts of 20 and 32 tokens take the short factors, 33
    and 100 the long ones, as transformers (max(position_ids) + 1 > original)."""
    _, hf, model = phi3(name)
    runner = SingleSequenceRunner(model, max_len=MAX_LEN)
    for length in PROMPT_LENGTHS[name]:
        ids = prompt(length)
        assert rel_err(runner.full_logits(ids), hf_full_logits(hf, ids)) <= 1e-4, (name, length)


def test_long_and_short_factors_both_matter(phi3):
    """The oracle can tell the factor sets apart: a 100-token prompt whose first 32 positions take
    the short factors, or a 20-token one on the long factors, misses transformers by far."""
    _, hf, model = phi3("phi3_longrope")
    runner = SingleSequenceRunner(model, max_len=MAX_LEN)
    for length, forced in ((100, 1), (20, 10 * ORIGINAL)):
        ids = prompt(length)
        logits = runner.run(ids, 0, prompt_len=forced)  # prompt_len alone picks the factors
        assert rel_err(logits, hf_full_logits(hf, ids)) > 1e-2, length


def test_chunked_prefill_and_cached_decode_match_transformers(phi3):
    """A 20-token prompt decoding across the original context (positions 20..59, long from 32 on)
    and a 33-token prompt prefilled in chunks of 11 (context lengths 11 and 22 after the first
    two, below 32), then decoded: each step equals transformers' cached decode of the same tokens."""
    _, hf, model = phi3("phi3_longrope")
    for length, chunk, steps in ((20, 20, 40), (ORIGINAL + 1, 11, 12)):
        ids = prompt(length + steps, seed=3)
        want = hf_cached_steps(hf, ids[:length], ids[length:])
        runner = SingleSequenceRunner(model, max_len=MAX_LEN, page_size=4)
        for s in range(0, length, chunk):
            got = runner.run(ids[s:min(s + chunk, length)], s, last_only=True, prompt_len=length)
        rows = [got[0]]
        for pos in range(length, length + steps):
            rows.append(runner.run([ids[pos]], pos, last_only=True, prompt_len=length)[0])
        for i, (ours, ref) in enumerate(zip(rows, want)):
            assert rel_err(ours, ref) <= 1e-4, (length, i)


@pytest.mark.parametrize("name, length", [("phi3_window", 7), ("phi3_longrope", ORIGINAL + 1),
                                          ("phi3_longrope", 20)])
def test_greedy_tokens_match_transformers(name, length, phi3):
    """32 greedy tokens. Where transformers' generate and its cached decode agree (no LongRoPE,
    or a prompt already past the original context) both are checked; a 20-token LongRoPE prompt
    decodes past 32, where generate re-encodes the sequence (models.rope), so its oracle is the
    cached decode."""
    _, hf, model = phi3(name)
    ids = prompt(length, seed=1)
    ours = SingleSequenceRunner(model, max_len=MAX_LEN).greedy(ids, 32)
    assert ours == hf_cached_greedy(hf, ids, 32)
    if name == "phi3_window" or length > ORIGINAL:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, length, dtype=torch.long))
        assert ours == ref[0, length:].tolist()


def test_window_and_partial_rotary_are_honoured(phi3):
    """Sanity of the oracle for the window model: rotating every dim, or dropping the window,
    changes the logits of a 45-token prompt by far."""
    import dataclasses

    from flax import nnx

    from jaxserve.models.decoder import CausalLM

    path, hf, model = phi3("phi3_window")
    cfg = model.cfg
    ids = prompt(45)
    want = hf_full_logits(hf, ids)
    _, state = nnx.split(model)
    for changed in (dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, partial_rotary_factor=1.0)),
                    dataclasses.replace(cfg, sliding_windows=(None,) * cfg.num_layers)):
        other = nnx.merge(nnx.split(nnx.eval_shape(lambda c=changed: CausalLM(c)))[0], state)
        assert rel_err(SingleSequenceRunner(other, max_len=MAX_LEN).full_logits(ids), want) > 1e-2


def test_orbax_conversion_gives_the_same_logits(phi3, tmp_path):
    path, hf, _ = phi3("phi3_longrope")
    orbax = convert(str(path), tmp_path / "orbax", dtype="float32")
    runner = SingleSequenceRunner(load_model(orbax).model, max_len=MAX_LEN)
    for length in (20, 100):
        ids = prompt(length)
        assert rel_err(runner.full_logits(ids), hf_full_logits(hf, ids)) <= 1e-4, length


# -- config and weights -------------------------------------------------------------------


def hf_config(**fields) -> dict:
    """A Phi-3 config.json as transformers writes it."""
    return transformers.Phi3Config(**{**BASE, "num_key_value_heads": 2, **fields}).to_dict()


def longrope8(**extra) -> dict:
    """LongRoPE over all 8 dims of head_dim 8 (8 heads of 64): 4 factors each."""
    fields = longrope(**extra)
    fields["rope_parameters"].update(short_factor=SHORT[:4], long_factor=LONG[:4])
    return dict(num_attention_heads=8, **fields)


@pytest.mark.parametrize("fields", [
    longrope8(),  # factor from the ratio 256 / 32
    longrope8(factor=3.0),  # an explicit factor sets the attention factor
    longrope8(attention_factor=1.7),  # an explicit attention factor wins
    dict(partial_rotary_factor=0.75, **longrope()),  # 12 of 16 dims
    dict(partial_rotary_factor=0.5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
], ids=["ratio", "factor", "attention_factor", "partial", "default_partial"])
def test_rope_tables_equal_transformers(fields):
    """Inverse frequencies (short and long) and the attention factor equal transformers' rope
    init for the same config; the long set is the one it computes for a length past the
    original context."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = transformers.Phi3Config(**{**BASE, **fields})
    cfg = ModelConfig.from_hf(config.to_dict())
    dim = cfg.rope.rotary_dim(cfg.head_dim)
    is_longrope = config.rope_parameters["rope_type"] == "longrope"
    for long in (False, True) if is_longrope else (False,):
        if is_longrope:
            want, scale = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=ORIGINAL + 1 if long else None)
        else:
            want, scale = Phi3RotaryEmbedding.compute_default_rope_parameters(config)
        ours, our_scale = inverse_frequencies(cfg.rope, dim, cfg.max_position_embeddings, long=long)
        assert ours.shape == tuple(want.shape)
        np.testing.assert_allclose(ours, want.numpy(), rtol=1e-6, atol=0)
        assert math.isclose(our_scale, scale, rel_tol=1e-12), (long, our_scale, scale)
    if is_longrope and "attention_factor" not in config.rope_parameters:
        factor = config.rope_parameters.get("factor") or 256 / ORIGINAL
        assert math.isclose(our_scale, math.sqrt(1 + math.log(factor) / math.log(ORIGINAL)))


def test_phi3_config_fields():
    # transformers checks factor lengths against hidden / heads (16 x 0.75: 6) but computes with
    # head_dim (24 x 0.75: 9 frequencies), so no such Phi3Config builds; ours follows head_dim.
    hf = hf_config(partial_rotary_factor=0.75, head_dim=24, sliding_window=9)
    hf.update(original_max_position_embeddings=ORIGINAL, rope_parameters=dict(
        hf["rope_parameters"], rope_type="longrope", short_factor=[1.0] * 9, long_factor=[2.0] * 9))
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.model_type, cfg.head_dim, cfg.rope.rope_type, cfg.rope.rotary_dim(24)) == ("phi3", 24, "longrope", 18)
    assert cfg.rope.original_max_position_embeddings == ORIGINAL and cfg.rope.factor == 256 / ORIGINAL
    assert cfg.sliding_windows == (9, 9) and cfg.rope.long_context_threshold == ORIGINAL
    # The transformers 4 form of the Hub's Phi-3 checkpoints: rope_scaling with the legacy
    # type 'su', the original context at the top level, partial_rotary_factor at the top level.
    legacy = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], **{k: v for k, v in BASE.items()},
                  num_key_value_heads=2, original_max_position_embeddings=64, partial_rotary_factor=0.5,
                  rope_theta=500.0, sliding_window=256,
                  rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [3.0] * 4})
    cfg = ModelConfig.from_hf(legacy)
    assert (cfg.rope.rope_type, cfg.rope.theta, cfg.rope.original_max_position_embeddings) == ("longrope", 500.0, 64)
    assert cfg.rope.long_factor == (3.0,) * 4 and cfg.rope.rotary_dim(16) == 8
    assert cfg.sliding_windows == (None, None)  # a window covering max_position_embeddings is no window
    del legacy["original_max_position_embeddings"]
    assert ModelConfig.from_hf(legacy).rope.original_max_position_embeddings == 4096  # Phi3Config's default


@pytest.mark.parametrize("change, message", [
    (dict(model_type="phi3small", architectures=["Phi3SmallForCausalLM"]), "unsupported model_type 'phi3small'"),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8}), "'long_factor'"),
    (dict(rope_scaling={"type": "longrope", "long_factor": [1.0] * 8}), "'short_factor'"),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 7}),
     "7 entries; rotary_dim 16 .* needs 8"),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 6}),
     "short_factor has 8 entries, long_factor 6"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type 'linear' is not supported"),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [0.0] * 8}), "long_factor"),
    (dict(partial_rotary_factor=0.7), "rotates 11 dims"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor must be in"),
    (dict(hidden_act="relu"), "hidden_act 'relu'"),
])
def test_unsupported_phi3_configs_are_refused_naming_the_key(change, message):
    hf = {"model_type": "phi3", **BASE, "num_key_value_heads": 2, "original_max_position_embeddings": 32, **change}
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_hf(hf)


def test_fused_tensors_split_into_rows_and_wrong_shapes_are_refused():
    cfg = ModelConfig.from_hf(hf_config())  # 4 heads, 2 kv heads, head_dim 16, 96 mlp
    qkv = np.arange((4 + 2 * 2) * 16 * 64, dtype=np.float32).reshape(128, 64)
    gate_up = -np.arange(2 * 96 * 64, dtype=np.float32).reshape(192, 64)
    parts = dict((n, read()) for n, read in split_fused(cfg, [
        ("model.layers.1.self_attn.qkv_proj.weight", lambda: qkv), ("model.layers.1.mlp.gate_up_proj.weight",
                                                                   lambda: gate_up),
        ("model.norm.weight", lambda: np.ones(64))]))
    p = "model.layers.1."
    assert list(parts) == [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight",
                           p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", "model.norm.weight"]
    np.testing.assert_array_equal(parts[p + "self_attn.q_proj.weight"], qkv[:64])
    np.testing.assert_array_equal(parts[p + "self_attn.k_proj.weight"], qkv[64:96])
    np.testing.assert_array_equal(parts[p + "self_attn.v_proj.weight"], qkv[96:])
    np.testing.assert_array_equal(parts[p + "mlp.gate_proj.weight"], gate_up[:96])
    np.testing.assert_array_equal(parts[p + "mlp.up_proj.weight"], gate_up[96:])
    with pytest.raises(ModelLoadError, match=r"qkv_proj.weight' has shape \(96, 64\), expected \(128, 64\)"):
        list(split_fused(cfg, [("model.layers.0.self_attn.qkv_proj.weight", lambda: qkv[:96])]))


def test_rope_config_refuses_factor_lists_outside_longrope():
    with pytest.raises(ModelConfigError, match="longrope keys"):
        RopeConfig(short_factor=(1.0,), long_factor=(1.0,))
    with pytest.raises(ModelConfigError, match="original_max_position_embeddings"):
        RopeConfig(rope_type="longrope", short_factor=(1.0,), long_factor=(1.0,))
