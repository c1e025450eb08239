"""LoRA under tensor parallelism (issue 18): tensor parallel 1 / 2 / 4 on fake CPU devices give
identical greedy tokens for a batch mixing three adapters and the base model, and the slot arrays
are split like their base layers (one subprocess, lora_mesh_check.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from engine_fixtures import write_engine_test_model  # noqa: E402
from lora_fixtures import write_adapters  # noqa: E402
from test_sharding import CPU, HERE, run_script  # noqa: E402


# make test: model=4 (kv heads copied) against model=1; model=2 is slow.
@pytest.mark.parametrize("meshes", [["model=1", "model=4"],
                                    pytest.param(["model=1", "model=2"], marks=pytest.mark.slow)], ids=["tp4", "tp2"])
def test_tensor_parallel_1_2_4_identical_tokens_with_adapters(tmp_path, meshes):
    write_engine_test_model(tmp_path / "base", num_heads=8)  # 8 heads, 2 kv heads: copied 2x at model=4
    adapters = write_adapters(tmp_path / "base", tmp_path)
    (result,) = run_script([str(HERE / "lora_mesh_check.py"), str(tmp_path / "base"), CPU,
                            *(f"{name}={path}" for name, (path, _) in adapters.items()), "--", *meshes])
    runs = result["meshes"]
    for mesh in meshes:
        assert runs[mesh]["tokens"] == runs["model=1"]["tokens"], mesh
        assert runs[mesh]["compiles"] == runs[mesh]["programs"], mesh  # adapters loaded and mixed: no compile
    adapted = [i for i in range(16) if i % 4]  # requests 1, 2, 3 (mod 4) run alpha, beta, gamma
    changed = [i for i in adapted if runs["model=1"]["tokens"][i] != result["base_tokens"][i]]
    assert len(changed) >= len(adapted) // 2, changed  # the adapters are applied, not skipped
    assert all(runs["model=1"]["tokens"][i] == result["base_tokens"][i] for i in range(0, 16, 4))
    specs = runs[meshes[-1]]["specs"]  # [layers, slot, ...]: B split like its base output, A like its input
    assert specs["q_proj_a"] == "P(None, None, None, None)"
    assert specs["q_proj_b"] == "P(None, None, None, 'model', None)"
    assert specs["k_proj_b"] == "P(None, None, None, 'model', None)"
    assert specs["o_proj_a"] == "P(None, None, 'model', None, None)"
    assert specs["o_proj_b"] == "P(None, None, None, None)"
    assert specs["gate_proj_b"] == "P(None, None, None, 'model')"
    assert specs["down_proj_a"] == "P(None, None, 'model', None)"
