"""Quantized weights under tensor parallelism (8 fake CPU devices, one subprocess): an int8-weight
engine gives identical greedy tokens on meshes model=1/2/4/8, its values and scales split over
the model axis along their output channels (a scale is never split on a contracted axis, where
it has size 1), and each device holds a 1/tp share of the split projections."""

from __future__ import annotations

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


def test_int8_weight_engine_gives_identical_tokens_over_tensor_parallel_meshes(model8, monkeypatch):  # noqa: F811
    meshes = ["model=1", "model=2", "model=4", "model=8"]
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
    per_device = [runs[m]["weight_bytes_per_device"] for m in meshes]
    assert per_device == sorted(per_device, reverse=True) and per_device[3] < per_device[0] / 4
