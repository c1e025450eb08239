"""Loading: config forms, sharded checkpoints, sharding placement, Orbax, and bad input."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxserve.models.config import ModelConfig, ModelConfigError, ModelLoadError
from jaxserve.models.loader import load_model
from jaxserve.models.orbax_checkpoint import convert
from jaxserve.models.registry import read_rope, supported_model_types
from jaxserve.models.single_sequence import SingleSequenceRunner

IDS = [5, 17, 3, 44, 90, 12, 7]


def logits(model, ids=IDS):
    return SingleSequenceRunner(model, max_len=32).full_logits(ids)


@pytest.fixture
def llama_copy(hf_model_dir, tmp_path):
    src, _ = hf_model_dir("llama3")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_transformers4_and_5_config_forms_agree(hf_model_dir):
    src, _ = hf_model_dir("llama3")
    new = json.loads((src / "config.json").read_text())
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(new["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    old["torch_dtype"] = "bfloat16"
    assert read_rope(old) == read_rope(new)
    assert read_rope(new).rope_type == "llama3"
    assert ModelConfig.from_hf(old).checkpoint_dtype == "bfloat16"


def test_sharded_checkpoint_with_index(hf_model_dir, tmp_path):
    src, hf = hf_model_dir("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    np.testing.assert_array_equal(logits(load_model(tmp_path).model), logits(load_model(src).model))


def test_parameters_placed_with_sharding_of_their_logical_axes(hf_model_dir):
    src, _ = hf_model_dir("qwen3")
    seen = []
    device = jax.devices()[0]

    def sharding_fn(axes):
        seen.append(axes)
        return jax.sharding.SingleDeviceSharding(device)

    loaded = load_model(src, sharding_fn=sharding_fn)
    assert ("embed", "heads", "head_dim") in seen and ("vocab", "embed") in seen
    assert ("embed", "mlp") in seen and ("head_dim",) in seen
    assert loaded.model.layers.self_attn.q_proj[...].sharding == jax.sharding.SingleDeviceSharding(device)


def test_orbax_round_trip_identical_logits(hf_model_dir, tmp_path):
    src, _ = hf_model_dir("granite")
    dst = convert(str(src), tmp_path / "converted")
    assert (dst / "jaxserve_checkpoint.json").is_file() and not list(dst.glob("*.safetensors"))
    np.testing.assert_array_equal(logits(load_model(dst).model), logits(load_model(src).model))


def test_orbax_round_trip_bfloat16(hf_model_dir, tmp_path):
    src, _ = hf_model_dir("llama3")
    dst = convert(str(src), tmp_path / "bf16", dtype="bfloat16")
    restored = load_model(dst, dtype="bfloat16")
    assert restored.model.embed_tokens[...].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(logits(restored.model), logits(load_model(src, dtype="bfloat16").model))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_local_path_is_not_a_hub_id():
    with pytest.raises(ModelLoadError, match="not a local directory"):
        load_model("./no/such/model/dir")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not be downloaded"):
        load_model("jaxserve-tests/does-not-exist")


def test_unsupported_model_type_lists_supported(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt_neox", ["GPTNeoXForCausalLM"]
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError) as err:
        load_model(llama_copy)
    assert "gpt_neox" in str(err.value)
    for name in supported_model_types():
        assert name in str(err.value)


def test_missing_tensor_is_named(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(llama_copy)


def test_misshaped_tensor_is_named(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(3, 64\)"):
        load_model(llama_copy)


def test_no_weights_is_a_clear_error(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(llama_copy)


def test_bad_head_counts_refused(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="multiple of num_key_value_heads"):
        load_model(llama_copy)


def test_bad_dtype_refused(llama_copy):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(llama_copy, dtype="int8")
