"""The scanned layer stack: parameters stacked on a "layers" axis, one KV array updated in place."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.models.attention_metadata import single_sequence_metadata
from jaxserve.models.config import ModelConfig
from jaxserve.models.decoder import CausalLM, copy_pages, init_kv_caches, kv_cache_shape, layer_groups
from jaxserve.models.rope import inverse_frequencies, rotary_cos_sin

PAGES, PAGE_SIZE = 1024, 4
HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def tiny_config(num_layers: int = 3, sliding_windows=None) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                       num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=16,
                       max_position_embeddings=128, sliding_windows=sliding_windows or (None,) * num_layers)


def compiled_step(cfg: ModelConfig, num_tokens: int = 8):
    """The model's step jitted with the KV cache donated, compiled for one sequence."""
    graphdef, state = nnx.split(CausalLM(cfg))
    kv = init_kv_caches(cfg, PAGES, PAGE_SIZE, jnp.float32)
    md = jax.tree.map(jnp.asarray, single_sequence_metadata([1, 2, 3, 4], PAGE_SIZE, 4, 0, num_tokens))
    ids = jnp.arange(num_tokens, dtype=jnp.int32)

    def step(state, kv, ids, md):
        return nnx.merge(graphdef, state)(kv, ids, ids, md)

    f = jax.jit(step, donate_argnums=(1,))
    return f, (state, kv, ids, md), f.lower(state, kv, ids, md).compile()


def test_layer_groups_scan_runs_of_equal_windows_or_a_repeated_pattern():
    assert layer_groups((None, None, None)) == [(0, 3, (None,))]
    assert layer_groups((None, 8, 8)) == [(0, 1, (None,)), (1, 3, (8,))]
    assert layer_groups((8, None) * 4) == [(0, 8, (8, None))]
    assert layer_groups((8, 8, None) * 3 + (8,)) == [(0, 9, (8, 8, None)), (9, 10, (8,))]
    assert layer_groups((8, None, 4, 2)) == [(0, 1, (8,)), (1, 2, (None,)), (2, 3, (4,)), (3, 4, (2,))]


def test_layer_parameters_are_stacked_on_an_unsharded_layers_axis():
    cfg = tiny_config()
    model = nnx.eval_shape(lambda: CausalLM(cfg))
    for path, var in nnx.to_flat_state(nnx.state(model.layers, nnx.Param)):
        assert var.get_metadata()["out_sharding"][0] == "layers", path
        assert var.get_value().shape[0] == cfg.num_layers, path
    q = CausalLM(cfg).layers.self_attn.q_proj[...]
    assert not np.allclose(q[0], q[1])  # each layer drawn at random on its own


def test_kv_cache_is_one_array_updated_in_place():
    cfg = tiny_config()
    _, _, compiled = compiled_step(cfg)
    kv_bytes = int(np.prod(kv_cache_shape(cfg, PAGES, PAGE_SIZE))) * 4
    layer_bytes = kv_bytes // cfg.num_layers
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes == kv_bytes  # the output KV is the donated input buffer
    # No copy of the cache, nor of one layer's pages, anywhere in the step.
    assert mem.temp_size_in_bytes < layer_bytes / 4, mem
    layer_shape = "f32[{},{},{},{}]".format(*kv_cache_shape(cfg, PAGES, PAGE_SIZE)[1:])
    assert layer_shape not in compiled.as_text()


def test_step_program_size_does_not_grow_with_depth():
    lines = [len(compiled_step(tiny_config(n))[2].as_text().splitlines()) for n in (2, 8)]
    assert lines[1] <= lines[0] * 1.05, lines


def test_each_layer_writes_its_own_pages():
    cfg = tiny_config(sliding_windows=(None, 8, 8))
    f, (state, kv, ids, md), _ = compiled_step(cfg)
    _check_layers_write_their_own_pages(f, state, kv, ids, md)


@pytest.mark.parametrize("windows", [(None, 8, 8, 8), (8, None, 8, None), (4, None, 4, None, 4)])
def test_grouped_layers_equal_one_window_at_a_time(windows):
    """The scan over groups of layers computes what running each layer on its own does."""
    cfg = tiny_config(len(windows), windows)
    f, (state, kv, ids, md), _ = compiled_step(cfg, num_tokens=12)
    kv, logits = f(state, kv, ids, md)
    model = nnx.merge(nnx.graphdef(CausalLM(cfg)), state)
    graphdef, stacked = nnx.split(model.layers)
    x = jnp.take(model.embed_tokens[...], ids, axis=0)
    inv_freq, scaling = inverse_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    cos, sin = rotary_cos_sin(ids, jnp.asarray(inv_freq), scaling)
    pages = jnp.zeros_like(kv).reshape(-1, *kv.shape[2:])
    for i, window in enumerate(windows):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
        x, pages = layer(x, cos, sin, pages, i * PAGES, md, window)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.compute_logits(model.norm(x))), atol=1e-5)
    np.testing.assert_allclose(np.asarray(kv), np.asarray(pages).reshape(kv.shape), atol=1e-6)


def _check_layers_write_their_own_pages(f, state, kv, ids, md):
    kv, _ = f(state, kv, ids, md)
    kv = np.asarray(kv)
    written = np.abs(kv).sum(axis=(2, 3, 4)) > 0  # [L, P]
    assert written[:, 1:3].all() and not written[:, 3:].any() and not written[:, 0].any()
    assert not np.allclose(kv[0, 1], kv[1, 1]) and not np.allclose(kv[1, 1], kv[2, 1])


def test_copy_pages_copies_every_layer_in_place():
    cfg = tiny_config()
    kv = jax.random.normal(jax.random.PRNGKey(0), kv_cache_shape(cfg, 8, PAGE_SIZE))
    want = np.asarray(kv).copy()
    want[:, [5, 6]] = want[:, [2, 3]]
    f = jax.jit(copy_pages, donate_argnums=(0,))
    src, dst = jnp.asarray([2, 3, 0], jnp.int32), jnp.asarray([5, 6, 0], jnp.int32)
    assert f.lower(kv, src, dst).compile().memory_analysis().alias_size_in_bytes == kv.nbytes
    np.testing.assert_array_equal(np.asarray(f(kv, src, dst)), want)


def test_a_list_of_per_layer_arrays_is_refused():
    cfg = tiny_config()
    model = CausalLM(cfg)
    md = jax.tree.map(jnp.asarray, single_sequence_metadata([1], PAGE_SIZE, 1, 0, 2))
    per_layer = list(init_kv_caches(cfg, 4, PAGE_SIZE, jnp.float32))
    with pytest.raises(TypeError, match="one stacked"):
        model(per_layer, jnp.zeros(2, jnp.int32), jnp.arange(2, dtype=jnp.int32), md)


def test_sharded_stacked_kv_cache_gives_single_device_logits(hf_model_dir):
    """Four fake devices in a subprocess: 2 kv heads split over 2 devices, and copied over 4 (XLA
    and a Pallas kernel through shard_map), against one device."""
    path, _ = hf_model_dir("llama3")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(HERE / "sharded_model_check.py"), str(path)], capture_output=True,
                          text=True, timeout=600, env=env)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    runs = results[0]
    want = np.asarray(runs["model=1,reference"]["logits"])
    for name, run in runs.items():
        np.testing.assert_allclose(np.asarray(run["logits"]), want, rtol=0, atol=1e-5 * np.abs(want).max(),
                                   err_msg=name)
        assert run["in_place"], name
        if name != "model=1,reference":
            assert run["kv_spec"] == run["want_spec"], name
    assert runs["model=2,reference"]["kv_heads_sharded"] and "'model'" in runs["model=2,reference"]["kv_spec"]
    # 2 kv heads over 4 devices: each copied twice, one whole head (K and V) per device.
    for name in ("model=4,reference", "model=4,pallas_gpu"):
        assert runs[name]["kv_head_replicas"] == 2 and "'model'" in runs[name]["kv_spec"], name
        assert runs[name]["kv_shard"][3] == 2, name
