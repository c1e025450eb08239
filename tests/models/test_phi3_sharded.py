"""Phi-3's fused qkv_proj / gate_up_proj split at load under tensor parallelism, on 8 fake CPU
devices (a subprocess): every device holds exactly its heads' rows of the fused tensors (kv heads
copied when fewer than the devices), from safetensors and from an Orbax conversion, and the
logits equal transformers'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxserve.models.orbax_checkpoint import convert
from phi3_fixtures import BASE, hf_full_logits, longrope, save_phi3

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
IDS = [(7 * i + 3) % 90 + 3 for i in range(40)]  # as phi3_tp_check.py: 40 > 32, the long factors
# 8 query heads of 8 dims, 2 kv heads, 96 mlp: splits over 1, 2 and 8 devices (kv copied 4x at 8).
FIELDS = dict(num_attention_heads=8, num_key_value_heads=2, partial_rotary_factor=0.75, **longrope(
    short_factor=[1.0, 1.7, 3.0], long_factor=[2.0, 5.0, 13.0]))


def test_fused_weights_split_and_shard_like_separate_ones(tmp_path):
    hf_dir = tmp_path / "phi3"
    hf = save_phi3(FIELDS, hf_dir)
    want = hf_full_logits(hf, IDS)
    orbax = convert(str(hf_dir), tmp_path / "orbax", dtype="float32")
    runs = {"tp1": f"{hf_dir}:1:reference", "tp2": f"{hf_dir}:2:xla", "tp8": f"{hf_dir}:8:reference",
            "tp8,orbax": f"{orbax}:8:reference"}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(HERE / "phi3_tp_check.py"), str(hf_dir),
                           *(f"{k}={v}" for k, v in runs.items())], capture_output=True, text=True, timeout=600,
                          env=env)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    n, kv, h, d, f, layers = 8, 2, 8, BASE["hidden_size"], BASE["intermediate_size"], BASE["num_hidden_layers"]
    for name, run in results[0].items():
        tp = int(name.split(",")[0][2:])
        np.testing.assert_allclose(np.asarray(run["logits"]), want, rtol=0, atol=1e-4 * np.abs(want).max(),
                                   err_msg=name)
        cached = max(kv, tp)
        assert run["replicas"] == cached // kv, name
        split = run["split"]
        for param in split.values():
            assert param["max_diff"] == 0.0 and param["devices"] == tp, (name, param)
        assert split["q_proj"]["shape"] == [layers, d, n, h] and split["q_proj"]["shard"] == [layers, d, n // tp, h]
        for param in ("k_proj", "v_proj"):
            assert split[param]["shape"] == [layers, d, cached, h], (name, split[param])
            assert split[param]["shard"] == [layers, d, cached // tp, h], (name, split[param])
        for param in ("gate_proj", "up_proj"):
            assert split[param]["shape"] == [layers, d, f] and split[param]["shard"] == [layers, d, f // tp]
        if tp > 1:
            assert "'model'" in split["q_proj"]["spec"] and "'model'" in split["gate_proj"]["spec"], name
