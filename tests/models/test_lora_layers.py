"""LoRA slots in the decoder (issue 18 part 1): logits of our model with an adapter in a slot
against transformers + peft applying the same adapter to the same random base model, and the
three delta formulations against a per-token numpy oracle."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from hf_fixtures import make_hf_model  # noqa: E402
from jaxserve.models.attention_metadata import single_sequence_metadata  # noqa: E402
from jaxserve.models.decoder import init_kv_caches  # noqa: E402
from jaxserve.models.loader import load_model  # noqa: E402
from jaxserve.models.lora import load_lora_adapter  # noqa: E402
from jaxserve.models.lora_layers import (LORA_METHODS, attach_lora, hf_module_shapes, lora_delta_shaped,  # noqa: E402
                                         lora_paths, slot_arrays)


@pytest.mark.parametrize("method", LORA_METHODS)
def test_delta_methods_match_per_token_oracle(method):
    rng = np.random.default_rng(0)
    t, s, r = 11, 4, 3
    x = rng.standard_normal((t, 5, 2)).astype(np.float32)  # two input axes (like o_proj's heads, head_dim)
    a = rng.standard_normal((s, 5, 2, r)).astype(np.float32)
    b = rng.standard_normal((s, r, 3, 4)).astype(np.float32)
    a[0], b[0] = 0, 0
    slots = rng.integers(0, s, t).astype(np.int32)
    want = np.stack([np.einsum("ij,ijr,rop->op", x[k], a[slots[k]], b[slots[k]]) for k in range(t)])
    got = jax.jit(lora_delta_shaped, static_argnums=(4,))(x, a, b, slots, method)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _peft_adapter(path, arch, r, targets, seed):
    model = peft.get_peft_model(make_hf_model(arch), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0, use_rslora=seed % 2 == 1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: draw both halves so the delta is not 0
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    return model.eval()


def _logits(model, ids, slot):
    from flax import nnx

    cfg = model.cfg
    kv = init_kv_caches(cfg, 5, 16, model.dtype)
    md = single_sequence_metadata([1, 2, 3, 4], 16, 4, 0, len(ids))
    md = dataclasses.replace(md, lora_slots=np.full(len(ids), slot, np.int32))
    g, st = nnx.split(model)

    @jax.jit
    def run(st, kv, md):
        return nnx.merge(g, st)(kv, jnp.asarray(ids, jnp.int32), jnp.arange(len(ids), dtype=jnp.int32), md)[1]

    return np.asarray(run(st, kv, md))


@pytest.mark.parametrize("arch", ["llama3", "qwen3", "llama2_bias"])
def test_logits_with_adapters_match_peft(tmp_path, hf_model_dir, arch):
    path, hf = hf_model_dir(arch)
    model = load_model(path).model
    attach_lora(model, max_loras=2, max_lora_rank=8)
    cfg = model.cfg
    adapters = [(4, ("q_proj", "v_proj", "down_proj")), (8, ("k_proj", "o_proj", "gate_proj", "up_proj"))]
    from flax import nnx

    _, state = nnx.split(model)
    variables = dict(nnx.to_flat_state(state))
    paths = lora_paths(state)
    peft_models = []
    for slot, (r, targets) in enumerate(adapters, start=1):
        d = tmp_path / f"a{slot}"
        peft_models.append(_peft_adapter(d, arch, r, targets, seed=slot))
        _, weights = load_lora_adapter(d, hf_module_shapes(cfg), cfg.num_layers, max_lora_rank=8)
        for p, arr in slot_arrays(cfg, weights, paths, 8, np.float32).items():
            variables[p].set_value(variables[p].get_value().at[:, slot].set(arr))
    ids = np.random.RandomState(3).randint(3, 97, size=12).tolist()
    with torch.no_grad():
        base = hf(torch.tensor([ids])).logits[0].numpy()
        want = [base] + [m(torch.tensor([ids])).logits[0].numpy() for m in peft_models]
    for slot, ref in enumerate(want):
        ours = _logits(model, ids, slot)
        assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4, (arch, slot)
    assert np.abs(want[1] - want[0]).max() > 0.05 and np.abs(want[2] - want[0]).max() > 0.05  # adapters matter
