"""Quantized weights under tensor parallelism (8 fake CPU devices, one subprocess each): an int8-weight
engine gives identical greedy tokens on meshes model=1/2/4/8, its values and scales split over
the model axis along their output channels (a scale is never split on a contracted axis, where
it has size 1), and each device holds a 1/tp share of the split projections; a mixture of experts
with int8 experts gives identical tokens with its experts (and their scales) split over 1, 2, 8.
make test runs model=1 against model=8 in each; the other meshes are slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_sharding import CPU, HERE, model8, run_script  # noqa: F401  (model8 is a fixture)

# [layers, ...] specs of each quantized projection's values and scale (DEFAULT_RULES: heads,
# kv_heads, mlp -> model; embed, head_dim unsplit).
SPECS = {
    "self_attn.q_proj": "P(None, None, 'model', None)", "self_attn.q_proj_scale": "P(None, None, 'model', None)",
    "self_attn.k_proj": "P(None, None, 'model', None)", "self_attn.k_proj_scale": "P(None, None, 'model', None)",
    "self_attn.o_proj": "P(None, 'model', None, None)", "self_attn.o_proj_scale": "P(None, None, None, None)",
    "mlp.gate_proj": "P(None, None, 'model')", "mlp.gate_proj_scale": "P(None, None, 'model')",
    "mlp.down_proj": "P(None, 'model', None)", "mlp.down_proj_scale": "P(None, None, None)",
}


# Each 8-device mesh is an engine to build and warm up: make test runs tp 8 against tp 1, and the
# expert-parallel check below ep 8 against ep 1; tp 2 / 4 and ep 2 are slow.
@pytest.mark.parametrize("meshes", [["model=1", "model=8"],
                                    pytest.param(["model=1", "model=2", "model=4"], marks=pytest.mark.slow)],
                         ids=["tp8", "tp2-tp4"])
def test_int8_weight_engine_gives_identical_tokens_over_tensor_parallel_meshes(model8, monkeypatch, meshes):  # noqa: F811
    monkeypatch.setenv("MESH_CHECK_QUANTIZATION", "int8")
    monkeypatch.setenv("MESH_CHECK_REQUESTS", "12")
    (result,) = run_script([str(HERE / "mesh_check.py"), str(model8), CPU, *meshes])
    runs = result["meshes"]
    for mesh in meshes:
        assert runs[mesh]["tokens"] == runs["model=1"]["tokens"], mesh
        assert runs[mesh]["free_pages"] == runs[mesh]["total_pages"]
        specs = runs[mesh]["weight_specs"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert specs[f"self_attn.{name}"][0] == "int8" and specs[f"self_attn.{name}_scale"][0] == "float32"
    for mesh in meshes[1:]:
        specs = runs[mesh]["weight_specs"]
        for name, spec in SPECS.items():
            assert specs[name][1] == spec, (mesh, name, specs[name])
    # embeddings / LM head split over vocab, the projections over heads / mlp: more devices, fewer bytes each
    # (at tp 8 under a quarter of tp 1's: the norms and the copied kv heads are not split 8 ways)
    per_device = [runs[m]["weight_bytes_per_device"] for m in meshes]
    tp = int(meshes[-1].split("=")[1])
    assert per_device == sorted(per_device, reverse=True) and per_device[-1] < per_device[0] * 2 / tp


@pytest.mark.parametrize("meshes", [["model=1", "model=8"],
                                    pytest.param(["model=1", "model=2"], marks=pytest.mark.slow)], ids=["ep8", "ep2"])
def test_int8_experts_give_identical_tokens_under_expert_parallelism(tmp_path, meshes):
    from moe_engine_fixtures import write_moe_engine_model
    from test_sharding import ROOT

    write_moe_engine_model(tmp_path, "qwen3_moe", num_attention_heads=8)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOE_CHECK_QUANTIZATION": "int8"}
    proc = subprocess.run([sys.executable, str(HERE / "moe_parallel_check.py"), str(tmp_path), CPU, *meshes],
                          capture_output=True, text=True, timeout=900, env=env)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    runs = results[0]["meshes"]
    for mesh in meshes:
        assert runs[mesh]["tokens"] == runs["model=1"]["tokens"], mesh
        assert runs[mesh]["gate_up_dtype"] == "int8"
        assert runs[mesh]["compiles_after"] == runs[mesh]["compiles_warm"]
        assert runs[mesh]["free_pages"] == runs[mesh]["total_pages"]
    for mesh in meshes[1:]:  # [layers, experts, 1, 2F]: whole experts' scales per device
        assert runs[mesh]["gate_up_scale_spec"] == "P(None, 'model', None, None)", mesh
