"""Kv heads under tensor parallelism (as vLLM): the KV cache's kv-head axis is split over the
model axis, whole heads per device; with fewer kv heads than devices each is copied tp / kv
times, so a device holds one head, never all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxserve.sharding import MeshConfig, MeshError
from jaxserve.models.config import ModelConfig, ModelConfigError, kv_head_replicas
from jaxserve.models.orbax_checkpoint import convert

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
IDS = [5, 17, 3, 44, 90, 12, 7, 8, 9, 10, 11]  # as kv_replicas_check.py


def config(heads: int, kv: int) -> ModelConfig:
    return ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv,
                                    head_dim=8))


def test_replicas_cover_the_devices_and_odd_sizes_are_refused_naming_them():
    assert [kv_head_replicas(2, tp) for tp in (1, 2, 4, 8)] == [1, 1, 2, 4]
    assert [kv_head_replicas(8, tp) for tp in (1, 2, 4, 8, 16, 32)] == [1, 1, 1, 1, 2, 4]
    with pytest.raises(ValueError, match=r"tensor parallel size 4 with 6 kv heads.*multiple"):
        kv_head_replicas(6, 4)
    with pytest.raises(MeshError, match=r"tensor parallel size 2 with 3 kv heads"):
        MeshConfig(model=2).validate_for(config(12, 3), [object()] * 2)
    MeshConfig(model=2, rules={"kv_heads": None}).validate_for(config(12, 3), [object()] * 2)  # kv kept whole
    with pytest.raises(ModelConfigError, match="kv_head_replicas"):
        ModelConfig(**{**config(4, 2).__dict__, "kv_head_replicas": 4})  # 8 cached kv heads > 4 query heads


@pytest.mark.parametrize("heads,kv,tp", [(8, 2, 8), (8, 2, 4), (8, 4, 2), (8, 4, 4), (32, 8, 16), (16, 1, 4)])
def test_each_devices_query_heads_read_the_copy_on_that_device(heads, kv, tp):
    """GQA mapping: query head i reads cached head i // (N / K); with r copies, cached head j is
    kv head j // r, which must be the head HF's query head i reads (i // (N / kv)), and both the
    query head and the cached head must be on the same device."""
    cfg = config(heads, kv).for_tensor_parallel(tp)
    cached, r = cfg.cache_kv_heads, cfg.kv_head_replicas
    assert cached == max(kv, tp) and cached % tp == 0
    for i in range(heads):
        j = i // (heads // cached)
        assert j // r == i // (heads // kv)
        assert i // (heads // tp) == j // (cached // tp)  # the device of query head i holds cached head j


def save_model(path: Path, heads: int, kv: int, seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=8,
                                      max_position_embeddings=256, rms_norm_eps=1e-5, attention_bias=True)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor (biases too) random, so a head copied wrong changes the logits
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + (0.2 if "norm" in name else 0.15) * torch.randn(
                p.shape, generator=gen))
    model.save_pretrained(path)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def test_kv_heads_split_or_copied_over_8_devices_give_the_hf_logits(tmp_path):
    """8 fake devices: 2 kv heads at tp 8 (copied 4x), 4 kv heads at tp 2, 4 and 8 (split,
    split one each, copied 2x), through XLA's partitioner (reference and xla backends), a Pallas
    kernel under shard_map, and an Orbax checkpoint copied after restore. Every device holds its
    own heads only."""
    kv2, kv4 = tmp_path / "kv2", tmp_path / "kv4"
    want = {"kv2": save_model(kv2, 8, 2), "kv4": save_model(kv4, 8, 4, seed=1)}
    orbax = convert(str(kv2), tmp_path / "kv2_orbax", dtype="float32")
    runs = {"kv2,tp1": f"{kv2}:1:reference", "kv2,tp8": f"{kv2}:8:reference", "kv2,tp8,pallas": f"{kv2}:8:pallas_gpu",
            "kv2,tp8,orbax": f"{orbax}:8:reference", "kv4,tp2": f"{kv4}:2:reference",
            "kv4,tp4": f"{kv4}:4:reference", "kv4,tp8,xla": f"{kv4}:8:xla"}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(HERE / "kv_replicas_check.py"), *(f"{k}={v}" for k, v in runs.items())],
                          capture_output=True, text=True, timeout=600, env=env)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    got = results[0]
    for name, run in got.items():
        hf = want[name.split(",")[0]]
        np.testing.assert_allclose(np.asarray(run["logits"]), hf, rtol=0, atol=2e-5 * np.abs(hf).max(), err_msg=name)
        tp = int(name.split(",")[1][2:])
        kv = 2 if name.startswith("kv2") else 4
        cached = max(kv, tp)
        assert run["replicas"] == max(1, tp // kv) and run["kv_shape"][3] == 2 * cached, name
        assert run["kv_shard"][3] == 2 * cached // tp and len(run["all_shard_bytes"]) == 1, name  # whole heads
        assert run["kv_shard_bytes"] == run["layout_page_bytes"] * run["kv_shape"][1], name  # what is logged
        per_device = cached // tp
        assert run["heads_by_device"] == [list(range(d * per_device, (d + 1) * per_device)) for d in range(tp)], name
        print(name, run["kv_shard"], run["kv_shard_bytes"], "bytes per device, old layout", run["old_shard_bytes"])
    # 2 kv heads at tp 8: one head per device, half of the old layout (both heads on every device).
    for name in ("kv2,tp8", "kv2,tp8,pallas", "kv2,tp8,orbax"):
        assert got[name]["kv_shard"][3] == 2 and got[name]["kv_shard_bytes"] * 2 == got[name]["old_shard_bytes"]
    assert got["kv4,tp8,xla"]["kv_shard_bytes"] * 4 == got["kv4,tp8,xla"]["old_shard_bytes"]
    for name in ("kv4,tp2", "kv4,tp4"):  # kv >= tp: as before
        assert got[name]["kv_shard_bytes"] == got[name]["old_shard_bytes"]
