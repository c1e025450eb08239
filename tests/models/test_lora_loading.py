"""PEFT adapter loading (issue 18 part 1): our A/B against peft's own module outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from jaxserve.models.lora import LoRAAdapterConfig, load_lora_adapter  # noqa: E402
from tests.models.hf_fixtures import make_hf_model  # noqa: E402

H, Q, KV, I = 64, 64, 32, 96  # hidden, heads*head_dim, kv_heads*head_dim, intermediate of the llama3 fixture
SHAPES = {"q_proj": (H, Q), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (Q, H),
          "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def _save_adapter(tmp_path, r, targets, use_rslora=False, seed=1):
    base = make_hf_model("llama3")
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r + 3, target_modules=list(targets),
                                                      use_rslora=use_rslora, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: draw both halves so the delta is not trivially 0
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path)
    return model.eval()


@pytest.mark.parametrize("r,targets,rslora", [(4, ("q_proj", "v_proj"), False),
                                              (8, ("o_proj", "gate_proj", "down_proj", "k_proj", "up_proj"), True)])
def test_delta_matches_peft(tmp_path, r, targets, rslora):
    model = _save_adapter(tmp_path, r, targets, rslora)
    cfg, weights = load_lora_adapter(tmp_path, SHAPES, num_layers=2, max_lora_rank=8)
    assert cfg.r == r and set(cfg.target_modules) == set(targets) and cfg.use_rslora == rslora
    assert set(weights) == {(l, m) for l in range(2) for m in targets}
    rng = np.random.default_rng(0)
    for (layer, module), (a, b) in weights.items():
        parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        mod = getattr(getattr(model.base_model.model.model.layers[layer], parent), module)
        x = rng.standard_normal((3, SHAPES[module][0])).astype(np.float32)
        with torch.no_grad():
            want = (mod(torch.from_numpy(x)) - mod.base_layer(torch.from_numpy(x))).numpy()
        np.testing.assert_allclose((x @ a) @ b, want, rtol=1e-4, atol=1e-5)


def test_refusals(tmp_path):
    _save_adapter(tmp_path, 8, ("q_proj",))
    with pytest.raises(ValueError, match="max_lora_rank=4"):
        load_lora_adapter(tmp_path, SHAPES, num_layers=2, max_lora_rank=4)
    with pytest.raises(ValueError, match="do not match the base model"):
        load_lora_adapter(tmp_path, {**SHAPES, "q_proj": (H, 2 * Q)}, num_layers=2, max_lora_rank=8)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for patch, msg in [({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"),
                       ({"target_modules": ["lm_head"]}, "lm_head"), ({"target_modules": ["embed_tokens"]}, "embed_tokens"),
                       ({"target_modules": ["fc1"]}, "fc1"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, **patch}))
        with pytest.raises(ValueError, match=msg):
            load_lora_adapter(tmp_path, SHAPES, num_layers=2, max_lora_rank=8)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRAAdapterConfig(r=0, lora_alpha=1.0, target_modules=("q_proj",))


def test_lora_delta_mixed_slots():
    from jaxserve.models.lora import lora_delta, pad_to_slot

    rng = np.random.default_rng(3)
    ranks, R, d_in, d_out = (2, 5), 8, 16, 12
    halves = [(rng.standard_normal((d_in, r)).astype(np.float32), rng.standard_normal((r, d_out)).astype(np.float32))
              for r in ranks]
    padded = [pad_to_slot(a, b, R) for a, b in halves]
    a_stack = np.stack([np.zeros((d_in, R), np.float32)] + [p[0] for p in padded])  # [3, in, R]
    b_stack = np.stack([np.zeros((R, d_out), np.float32)] + [p[1] for p in padded])  # [3, R, out]
    slots = np.array([0, 1, 2, 2, 0, 1, 1], np.int32)
    x = rng.standard_normal((len(slots), d_in)).astype(np.float32)
    got = np.asarray(lora_delta(x, a_stack, b_stack, slots))
    want = np.stack([np.zeros(d_out, np.float32) if s == 0 else x[t] @ halves[s - 1][0] @ halves[s - 1][1]
                     for t, s in enumerate(slots)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
