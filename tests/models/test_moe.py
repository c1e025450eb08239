"""Mixtures of experts (models.moe): Mixtral, Qwen3-MoE and Qwen2-MoE against transformers on the
same random weights; the grouped matmul against the dense per-expert reference for any routing;
one compiled program whatever the routing; both checkpoint forms of the expert tensors and an
Orbax conversion; the config adapters' refusals; parameter counts of the real shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from moe_fixtures import MOE_ARCHS, save_hf_moe
from jaxserve.models.config import ModelConfig, ModelConfigError
from jaxserve.models.loader import load_model
from jaxserve.models.moe import dense_reference, grouped_experts, route
from jaxserve.models.orbax_checkpoint import convert
from jaxserve.models.single_sequence import SingleSequenceRunner

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """name -> (directory with the saved HF model (per-expert tensors), the PyTorch model)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            cache[name] = (path, save_hf_moe(name, path))
        return cache[name]

    return get


def prompt(length: int, seed: int = 0) -> list[int]:
    return np.random.RandomState(seed + length).randint(3, 97, size=length).tolist()


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def tensor_names(path: Path) -> set[str]:
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="numpy") as f:
            names.update(f.keys())
    return names


@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_logits_match_transformers(arch, moe_dir):
    path, hf = moe_dir(arch)
    loaded = load_model(path)
    assert loaded.config.num_experts == (hf.config.num_local_experts if arch == "mixtral" else hf.config.num_experts)
    runner = SingleSequenceRunner(loaded.model, max_len=64)
    for length in (1, 7, 45):
        ids = prompt(length)
        assert rel_err(runner.full_logits(ids), hf_logits(hf, ids)) < 1e-4, (arch, length)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_greedy_tokens_match_transformers(arch, moe_dir):
    path, hf = moe_dir(arch)
    runner = SingleSequenceRunner(load_model(path).model, max_len=64)
    ids = prompt(13, seed=1)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert runner.greedy(ids, 32) == ref[0, len(ids):].tolist()


def moe_config(e: int, k: int, norm: bool = True) -> ModelConfig:
    return ModelConfig(model_type="qwen3_moe", vocab_size=8, hidden_size=24, intermediate_size=8, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64,
                       sliding_windows=(None,), num_experts=e, num_experts_per_tok=k, moe_intermediate_size=20,
                       norm_topk_prob=norm)


def expert_weights(e: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((e, 24, 40)) * 0.3, jnp.float32),   # gate_up [E, D, 2F]
            jnp.asarray(rng.standard_normal((e, 20, 24)) * 0.3, jnp.float32),   # down [E, F, D]
            jnp.asarray(rng.standard_normal((24, e)), jnp.float32))             # router [D, E]


def routings(t: int, e: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Routing patterns int32[T, k] (distinct experts per token): random, all tokens on the same
    k experts (the rest empty), the last experts only, and one token per expert."""
    rng = np.random.default_rng(seed)
    return {"random": np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32),
            "first": np.tile(np.arange(k, dtype=np.int32), (t, 1)),
            "last": np.tile(np.arange(e - k, e, dtype=np.int32)[::-1], (t, 1)),
            "spread": ((np.arange(t)[:, None] + np.arange(k)[None]) % e).astype(np.int32)}


@pytest.mark.parametrize("t,e,k", [pytest.param(1, 4, 2, marks=pytest.mark.slow), (13, 16, 8), (40, 12, 3),
                                   pytest.param(64, 8, 1, marks=pytest.mark.slow)])
def test_grouped_matmul_equals_dense_per_expert_reference(t, e, k):
    gate_up, down, router = expert_weights(e, seed=t)
    x = jnp.asarray(np.random.default_rng(t + 1).standard_normal((t, 24)), jnp.float32)
    weights, experts = route(x, router, moe_config(e, k))
    np.testing.assert_allclose(np.asarray(jnp.sum(weights, axis=-1)), 1.0, rtol=1e-6)
    full = grouped_experts(x, weights, experts, gate_up, down)
    np.testing.assert_allclose(full, dense_reference(x, weights, experts, gate_up, down), rtol=1e-5, atol=1e-5)
    for ep in (2, 4):  # expert parallelism: E / ep experts per device, partial sums add up
        if e % ep == 0:
            n = e // ep
            parts = sum(grouped_experts(x, weights, experts - d * n, gate_up[d * n:(d + 1) * n],
                                        down[d * n:(d + 1) * n]) for d in range(ep))
            np.testing.assert_allclose(parts, full, rtol=1e-5, atol=1e-5)


def test_route_follows_each_family():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 24)), jnp.float32)
    router = expert_weights(8)[2]
    probs = jax.nn.softmax(x @ router, axis=-1)
    top = np.sort(np.asarray(probs), axis=-1)[:, ::-1][:, :3]
    raw, ids = route(x, router, moe_config(8, 3, norm=False))
    np.testing.assert_allclose(raw, top, rtol=1e-6)  # Qwen's default: the softmax probabilities themselves
    normed, ids2 = route(x, router, moe_config(8, 3, norm=True))
    np.testing.assert_allclose(normed, top / top.sum(-1, keepdims=True), rtol=1e-6)
    assert (np.asarray(ids) == np.asarray(ids2)).all()
    np.testing.assert_allclose(np.take_along_axis(np.asarray(probs), np.asarray(ids), -1), raw, rtol=1e-6)


def test_one_compiled_program_for_every_routing_pattern():
    """The group sizes are data: skewed, empty and one-per-expert routings all run the program
    compiled for the first, and each equals the dense reference."""
    t, e, k = 24, 8, 2
    gate_up, down, _ = expert_weights(e)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((t, 24)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).uniform(0.1, 1.0, (t, k)), jnp.float32)
    step = jax.jit(grouped_experts)
    for name, experts in routings(t, e, k).items():
        out = step(x, weights, jnp.asarray(experts), gate_up, down)
        np.testing.assert_allclose(out, dense_reference(x, weights, experts, gate_up, down), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert step._cache_size() == 1


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_per_expert_and_fused_checkpoints_and_orbax_load_the_same_weights(arch, moe_dir, tmp_path):
    """transformers 5 writes per-expert tensors by default (the published checkpoints' names;
    Mixtral's under block_sparse_moe.) and its fused [E, 2F, D] / [E, D, F] tensors with
    save_original_format=False; both, and an Orbax conversion, give identical parameters."""
    path, hf = moe_dir(arch)
    fused = tmp_path / "fused"
    hf.save_pretrained(fused, save_original_format=False)
    per_expert_names, fused_names = tensor_names(path), tensor_names(fused)
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    gate = "w1" if arch == "mixtral" else "gate_proj"
    assert f"model.layers.1.{block}.experts.3.{gate}.weight" in per_expert_names
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused_names
    assert not any(".experts.3." in n for n in fused_names)
    orbax = convert(str(path), tmp_path / "orbax", dtype="float32")
    states = {name: nnx.to_pure_dict(nnx.state(load_model(p).model, nnx.Param))
              for name, p in (("per_expert", path), ("fused", fused), ("orbax", orbax))}
    flat = {name: dict(jax.tree_util.tree_flatten_with_path(s)[0]) for name, s in states.items()}
    assert flat["per_expert"].keys() == flat["fused"].keys() == flat["orbax"].keys()
    for key, value in flat["per_expert"].items():
        for other in ("fused", "orbax"):
            np.testing.assert_array_equal(np.asarray(flat[other][key]), np.asarray(value), err_msg=f"{other} {key}")
    # The stacked expert weight holds HF's expert 3 of layer 1 in our [D, F] layout.
    gate_up = states["per_expert"]["layers"]["mlp"]["gate_up_proj"]  # [L, E, D, 2F]
    f = gate_up.shape[-1] // 2
    experts = hf.model.layers[1].mlp.experts
    np.testing.assert_array_equal(np.asarray(gate_up[1, 3]), experts.gate_up_proj[3].detach().numpy().T)
    assert f == experts.gate_up_proj.shape[1] // 2


def hf_config(**fields) -> dict:
    return {**dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=16), **fields}


def test_adapters_refuse_mixed_dense_and_sparse_layers_naming_the_key():
    assert ModelConfig.from_hf(hf_config(decoder_sparse_step=1, mlp_only_layers=[])).num_experts == 8
    with pytest.raises(ModelConfigError, match="decoder_sparse_step 2"):
        ModelConfig.from_hf(hf_config(decoder_sparse_step=2))
    with pytest.raises(ModelConfigError, match=r"mlp_only_layers \[1\]"):
        ModelConfig.from_hf(hf_config(mlp_only_layers=[1]))
    with pytest.raises(ModelConfigError, match="mlp_only_layers"):
        ModelConfig.from_hf(hf_config(model_type="qwen2_moe", mlp_only_layers=[0]))
    with pytest.raises(ModelConfigError, match="num_experts_per_tok must be in"):
        ModelConfig.from_hf(hf_config(num_experts_per_tok=9))
    with pytest.raises(ModelConfigError, match="num_local_experts"):
        ModelConfig.from_hf(dict(hf_config(model_type="mixtral"), num_local_experts=0))
    base = ModelConfig.from_hf(hf_config())
    with pytest.raises(ModelConfigError, match="expert_parallel"):
        ModelConfig(**{**base.__dict__, "expert_parallel": 3})  # 8 experts do not split over 3
    assert ModelConfig.from_hf(hf_config()).norm_topk_prob is False  # transformers' Qwen3-MoE default
    assert ModelConfig.from_hf(dict(hf_config(model_type="mixtral"), norm_topk_prob=False)).norm_topk_prob is True


def _random_model_presets() -> dict:
    spec = importlib.util.spec_from_file_location("make_random_model", ROOT / "scripts" / "make_random_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MOE_PRESETS


def test_parameter_counts_of_the_real_shapes():
    """Mixtral-8x7B: 46.7B parameters, 12.9B active; Qwen3-30B-A3B: 30.5B, 3.3B active (their model cards)."""
    presets = _random_model_presets()
    mixtral = ModelConfig.from_hf(presets["mixtral-8x7b"])
    qwen = ModelConfig.from_hf(presets["qwen3-30b-a3b"])
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.norm_topk_prob) == (8, 2, True)
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (128, 8, 768)
    assert 46.65e9 < mixtral.num_params < 46.75e9 and 12.85e9 < mixtral.num_active_params < 12.95e9
    assert 30.45e9 < qwen.num_params < 30.55e9 and 3.3e9 < qwen.num_active_params < 3.4e9  # "3.3B activated"
    small = ModelConfig.from_hf(presets["bench-moe-small"])
    assert small.num_experts == 8 and small.num_active_params < small.num_params
