"""Expert parallelism on 8 fake CPU devices: a Qwen3-MoE (16 experts, top-8) serves the same
greedy tokens with its experts split over 1, 2, 4 and 8 devices, each device holding E / ep
whole experts; and the rules tables validate the expert axes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.config import EngineConfig
from jaxserve.sharding import DEFAULT_RULES, MeshConfig, MeshError, Placement
from jaxserve.models.config import ModelConfig
from moe_engine_fixtures import write_moe_engine_model

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CPU = str(ROOT / "configs" / "cpu.yaml")


# Each 8-device mesh is an engine to build and warm up (~6 s on 2 cores): make test splits the experts
# over 8 devices against one, the other splits (2 and 4) are slow.
@pytest.mark.parametrize("meshes", [["model=1", "model=8"],
                                    pytest.param(["model=1", "model=2", "model=4"], marks=pytest.mark.slow)],
                         ids=["ep8", "ep2-ep4"])
def test_expert_parallel_1_2_4_8_give_identical_tokens(tmp_path, meshes):
    # 8 query heads (attention tensor parallel up to 8), 2 kv heads (copied from tp 4 up).
    write_moe_engine_model(tmp_path, "qwen3_moe", num_attention_heads=8)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(HERE / "moe_parallel_check.py"), str(tmp_path), CPU, *meshes],
                          capture_output=True, text=True, timeout=900, env=env)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    (result,) = results
    assert result["devices"] == 8
    runs = result["meshes"]
    for mesh in meshes:
        run, ep = runs[mesh], int(mesh.split("=")[1])
        assert run["tokens"] == runs["model=1"]["tokens"], mesh
        assert run["expert_parallel"] == run["model_expert_parallel"] == ep, mesh
        # [layers, experts, D, 2F]: whole experts per device, nothing else split
        assert run["gate_up_shard"] == [2, 16 // ep, 64, 80], mesh
        assert run["compiles_after"] == run["compiles_warm"], mesh
        assert run["free_pages"] == run["total_pages"], mesh
    split = runs[meshes[-1]]
    assert split["gate_up_spec"] == "P(None, 'model', None, None)"
    assert split["router_spec"] == "P(None, None, None)"  # every device routes every token
    # The loader writes one expert's [D, F] block into the expert-split [L, E, D, 2F] weight on
    # the device that holds it: no collective (it never gathers the whole weight).
    assert result["expert_update_collectives"] == [], result["expert_update_collectives"]
    assert any(len(t) > 1 for t in runs["model=1"]["tokens"])


def moe_config(experts: int = 8, heads: int = 8) -> ModelConfig:
    return ModelConfig.from_hf(dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=2,
                                    num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=16))


def test_rules_tables_place_and_validate_the_expert_axes():
    assert dict(DEFAULT_RULES)["expert"] == "model" and dict(DEFAULT_RULES)["expert_mlp"] is None
    with pytest.raises(MeshError, match=r"\['expert', 'expert_mlp'\] of one array on the same mesh axis"):
        MeshConfig(rules={"expert": "model", "expert_mlp": "model"})
    with pytest.raises(MeshError, match=r"model axis \(4\) needs it to divide num_experts \(6\).*\[1, 2\]"):
        MeshConfig(model=4).validate_for(moe_config(experts=6), [object()] * 4)
    MeshConfig(model=4, rules={**dict(DEFAULT_RULES), "expert": None}).validate_for(moe_config(6), [object()] * 4)
    # A preset's rules without "expert" keep every expert on every device; ours split them.
    for preset, ep in (("gpu-h200-8.yaml", None), ("gpu-h200-8-moe.yaml", "model"), ("tpu-v5e-8-moe.yaml", "model")):
        cfg = EngineConfig.load(ROOT / "configs" / preset)
        assert cfg.mesh.rule_table.get("expert") == ep and cfg.tensor_parallel_size == 8, preset


def test_placement_splits_experts_only_when_the_rules_say_so():
    import types

    mesh = types.SimpleNamespace(shape={"model": 4})  # Placement reads only the model axis' size here
    cfg = moe_config()
    assert Placement(mesh, dict(DEFAULT_RULES), cfg).expert_parallel == 4
    assert Placement(mesh, {**dict(DEFAULT_RULES), "expert": None}, cfg).expert_parallel == 1
    dense = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    assert Placement(mesh, dict(DEFAULT_RULES), dense).expert_parallel == 1
