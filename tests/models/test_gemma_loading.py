"""Gemma 2 / 3 configs and loading: transformers' defaults and both config forms, refusals
naming the key, weight names (text-only, and Gemma3ForConditionalGeneration in both namings,
its vision tower skipped), bfloat16, Orbax round trips, and the random-model script's presets."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gemma_fixtures import LENGTH, gemma, hf_config, hf_logits, logits, prompt, rel_err  # noqa: F401 (fixture)
from jaxserve.models.config import ModelConfig, ModelConfigError
from jaxserve.models.hf_weights import weight_specs
from jaxserve.models.loader import load_model
from jaxserve.models.orbax_checkpoint import convert
from jaxserve.models.single_sequence import SingleSequenceRunner
from jaxserve.models.registry import GEMMA2_DEFAULTS, GEMMA3_TEXT_DEFAULTS


# ---- config forms and refusals ----

@pytest.mark.parametrize("config_cls, defaults", [("Gemma2Config", GEMMA2_DEFAULTS),
                                                  ("Gemma3TextConfig", GEMMA3_TEXT_DEFAULTS)])
def test_adapter_defaults_are_transformers_defaults(config_cls, defaults):
    hf = getattr(transformers, config_cls)().to_dict()
    assert {k: hf[k] for k in defaults} == defaults


def test_sparse_gemma3_config_reads_like_transformers_full_one():
    """gemma-3-4b's config.json: a text_config of six keys, the rest transformers' defaults."""
    sparse = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "eos_token_id": [1, 106], "torch_dtype": "bfloat16",
              "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                              "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                              "sliding_window": 1024}}
    full = transformers.Gemma3Config.from_dict(sparse).to_dict()  # what from_pretrained reads
    ours, theirs = ModelConfig.from_hf(sparse), ModelConfig.from_hf(full)
    assert ours == theirs
    assert ours.sliding_windows == ((1024,) * 5 + (None,)) * 5 + (1024,) * 4
    assert (ours.rope.theta, ours.rope.rope_type, ours.rope.factor) == (1e6, "linear", 8.0)
    assert ours.sliding_rope.theta == 1e4 and ours.sliding_rope.rope_type == "default"
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.vocab_size) == (8, 4, 256, 262208)
    assert ours.eos_token_ids == (1, 106) and ours.checkpoint_dtype == "bfloat16" and ours.tie_word_embeddings


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_transformers4_config_form_reads_the_same(name, gemma):
    """4.x configs: top-level rope_theta (+ rope_scaling, rope_local_base_freq for Gemma 3), no
    layer_types (Gemma 2 alternates, Gemma 3 has sliding_window_pattern), torch_dtype."""
    path, _ = gemma(name)
    new = json.loads((path / "config.json").read_text())
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types", "dtype")}
    if name == "gemma2":
        old["rope_theta"] = new["rope_parameters"]["rope_theta"]
    else:
        full, local = dict(new["rope_parameters"]["full_attention"]), new["rope_parameters"]["sliding_attention"]
        old["rope_theta"], old["rope_local_base_freq"] = full.pop("rope_theta"), local["rope_theta"]
        old["rope_scaling"], old["sliding_window_pattern"] = {"type": full.pop("rope_type"), **full}, 3
    old["torch_dtype"] = new.get("dtype")
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(new)


@pytest.mark.parametrize("change, key", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "full_attention"]},
     "layer_types"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ({"sliding_window": None}, "sliding_window"),
    ({"hidden_activation": "relu"}, "hidden_activation"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "dynamic"),
])
def test_unsupported_gemma2_config_refused_naming_the_key(change, key):
    hf = {**hf_config("gemma2").to_dict(), **change}
    with pytest.raises(ModelConfigError, match=key):
        ModelConfig.from_hf(hf)


def test_flat_rope_parameters_refused_for_gemma3():
    hf = {**hf_config("gemma3_text").to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(ModelConfigError, match="rope_parameters"):
        ModelConfig.from_hf(hf)


# ---- loading ----

def test_bfloat16_load_close_to_float32(gemma):
    path, hf = gemma("gemma2")
    ids = prompt(LENGTH)
    ours = SingleSequenceRunner(load_model(path, dtype="bfloat16").model, max_len=64).full_logits(ids)
    assert rel_err(ours, hf_logits(hf, ids)) < 0.05


def test_weight_specs_cover_transformers_tensors_exactly(gemma):
    for name in ("gemma2_irregular", "gemma3_text"):
        path, hf = gemma(name)
        cfg = load_model(path).config
        theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()
                  if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        assert {k: s.hf_shape for k, s in weight_specs(cfg).items()} == theirs, name


def test_gemma3_wrapped_checkpoint_in_both_namings(gemma, tmp_path):
    """save_pretrained writes Gemma3ForConditionalGeneration as the hub checkpoints name it
    (language_model.model.*, vision_tower.*, multi_modal_projector.*); transformers 5's modules
    are model.language_model.*, model.vision_tower.*, ... Both load the same language model,
    and the vision tower and projector are skipped."""
    src, _ = gemma("gemma3")
    tensors = load_file(src / "model.safetensors")
    assert any(k.startswith("language_model.model.layers.") for k in tensors)
    assert any(k.startswith("vision_tower.") for k in tensors)
    assert any(k.startswith("multi_modal_projector.") for k in tensors)
    renamed = {}
    for k, v in tensors.items():
        for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(old):
                k = new + k[len(old):]
                break
        renamed[k] = v
    assert not any(k.startswith(("language_model.", "vision_tower.")) for k in renamed)
    dst = tmp_path / "gemma3-v5-names"
    shutil.copytree(src, dst)
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    ids = prompt(LENGTH)
    np.testing.assert_array_equal(logits(load_model(dst).model, ids), logits(load_model(src).model, ids))


# Gemma 3 (q/k norms, two RoPE bases) in make test; Gemma 2 is slow (the round trip does not depend on
# the architecture beyond which weights there are).
@pytest.mark.parametrize("name", [pytest.param("gemma2", marks=pytest.mark.slow), "gemma3"])
def test_orbax_round_trip_identical_logits(name, gemma, tmp_path):
    src, hf = gemma(name)
    dst = convert(str(src), tmp_path / "converted")
    assert (dst / "jaxserve_checkpoint.json").is_file() and not list(dst.glob("*.safetensors"))
    ids = prompt(LENGTH)
    restored = logits(load_model(dst).model, ids)
    np.testing.assert_array_equal(restored, logits(load_model(src).model, ids))
    assert rel_err(restored, hf_logits(hf, ids)) <= 1e-4


# ---- scripts/make_random_model.py presets ----

def _random_model_script():
    path = Path(__file__).parents[2] / "scripts" / "make_random_model.py"
    spec = importlib.util.spec_from_file_location("make_random_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset, low, high", [("gemma2-9b", 9.0e9, 9.5e9), ("gemma3-4b", 3.7e9, 4.0e9)])
def test_random_model_presets_are_what_transformers_builds(preset, low, high):
    """The preset's config reads the same through transformers' config class; transformers'
    model of it (on the meta device) has exactly the tensors we load; the script writes exactly
    those (checked on a narrowed copy, all layers kept); the size is the real model's."""
    script = _random_model_script()
    hf = script.GEMMA_PRESETS[preset]
    cfg = ModelConfig.from_hf(hf)
    config = transformers.CONFIG_MAPPING[hf["model_type"]].from_dict(hf)
    assert ModelConfig.from_hf(config.to_dict()) == cfg
    assert low < cfg.num_params < high
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert {k: s.hf_shape for k, s in weight_specs(cfg).items()} == theirs
    narrow = {**hf, "hidden_size": 32, "intermediate_size": 48, "vocab_size": 64, "head_dim": 8,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    written = dict(script.gemma_tensors(narrow, np.random.default_rng(0), np.float32))
    specs = weight_specs(ModelConfig.from_hf(narrow))
    assert {k: v.shape for k, v in written.items()} == {k: s.hf_shape for k, s in specs.items()}
    assert all(not v.any() for k, v in written.items() if "norm" in k)  # Gemma's identity: 1 + 0


# Gemma 2 in make test (4-5 s); Gemma 3 (7-8 s) is slow. test_random_model_presets_are_what_transformers_builds
# checks both presets' configs in make test, and the Gemma 3 family loads beside transformers in test_gemma.py.
@pytest.mark.parametrize("preset", ["gemma2-9b", pytest.param("gemma3-4b", marks=pytest.mark.slow)])
def test_random_model_script_writes_what_both_load_alike(preset, tmp_path):
    """A narrowed preset (all its layers, layer types, RoPE and caps) written by the script:
    jaxserve and transformers load the directory and agree on the logits."""
    script = _random_model_script()
    narrow = {**script.GEMMA_PRESETS[preset], "hidden_size": 32, "intermediate_size": 48, "vocab_size": 1024,
              "head_dim": 8, "num_attention_heads": 4, "num_key_value_heads": 2}
    script.GEMMA_PRESETS = {**script.GEMMA_PRESETS, "narrow": narrow}
    out = script.write("narrow", tmp_path / "narrow", "float32", seed=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = prompt(LENGTH)
    assert rel_err(logits(load_model(out).model, ids), hf_logits(hf, ids)) <= 1e-4
