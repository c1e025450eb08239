"""An 8-bit KV cache under tensor parallelism (8 fake CPU devices, subprocesses): the scales are
split over the model axis with their pages (whole kv heads per device, copied when there are
fewer kv heads than devices), the Pallas kernels through shard_map equal the reference on
8-bit pages, and an int8-KV engine gives identical greedy tokens on meshes model=1/2/4/8."""

from __future__ import annotations


import pytest

from test_sharding import CPU, HERE, case_names, model8, run_script  # noqa: F401  (model8 is a fixture)


# make test: kv heads split (model=2) and copied (model=8); model=4 (copied twice) is slow.
@pytest.mark.parametrize("meshes", [["model=1", "model=2", "model=8"],
                                    pytest.param(["model=1", "model=4"], marks=pytest.mark.slow)],
                         ids=["tp2-tp8", "tp4"])
def test_int8_kv_engine_gives_identical_tokens_over_tensor_parallel_meshes(model8, monkeypatch, meshes):  # noqa: F811
    monkeypatch.setenv("MESH_CHECK_KV_CACHE_DTYPE", "int8")
    monkeypatch.setenv("MESH_CHECK_REQUESTS", "12")
    (result,) = run_script([str(HERE / "mesh_check.py"), str(model8), CPU, *meshes])
    runs = result["meshes"]
    for mesh in meshes:
        assert runs[mesh]["tokens"] == runs["model=1"]["tokens"], mesh
        assert runs[mesh]["free_pages"] == runs[mesh]["total_pages"]
        assert runs[mesh]["kv_dtype"] == "int8"
    for mesh in meshes[1:]:                       # 2 kv heads: split over 2, copied over 4 and 8
        assert runs[mesh]["kv_spec"] == "P(None, None, None, 'model', None)", mesh
        assert runs[mesh]["scales_spec"] == "P(None, None, None, 'model')", mesh


# The TPU kernel in interpret mode is the slow one (18 s against 7): make test reads 8-bit pages through
# shard_map with the GPU kernel, kv heads split (2 devices, 4 heads) and copied (4 devices, 2 heads); its
# other two layouts and the TPU kernel are slow (test_sharding runs the TPU kernel through shard_map on
# plain pages).
@pytest.mark.parametrize("backend,kv_dtype,cases", [
    pytest.param("pallas_tpu", "int8", "2:4,2:2,4:2,4:1", marks=pytest.mark.slow),
    ("pallas_gpu", "fp8", "2:4,4:2"), pytest.param("pallas_gpu", "fp8", "2:2,4:1", marks=pytest.mark.slow)])
def test_pallas_kernels_through_shard_map_read_8bit_pages(backend, kv_dtype, cases, monkeypatch):
    monkeypatch.setenv("SHARDED_ATTENTION_CASES", cases)
    (errors,) = run_script([str(HERE / "sharded_attention_check.py"), backend, kv_dtype])
    assert set(errors) == case_names(cases)
    assert max(errors.values()) < 2e-5, errors
