"""Sizing and donation of an 8-bit KV cache (pallas_kernels.kv_quant.QuantizedKV).

KVLayout sizes pages by bytes, scales included: at Llama-3-8B's shapes (32 layers, 8 kv heads,
head_dim 128) a token takes 32 * 2 * 8 * (128 + 4) bytes against 32 * 2 * 8 * 256 for bf16, so
one budget holds 1.94x the pages. The step memory profile takes the cache's spec as a pytree,
and the jitted step donates pages and scales alike (aliased, updated in place)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_fixtures import write_engine_test_model
from jaxserve.core.step_shapes import StepShapes
from jaxserve.kernels.kv_quant import QuantizedKV
from jaxserve.sharding import DEFAULT_RULES, Placement
from jaxserve.worker.input_batch import CELL_BUCKET, BodyInputs, Cells
from jaxserve.worker.memory_profile import KVLayout, StepMemory, kv_pages_for, profile_step_memory
from jaxserve.worker.model_runner import ModelRunner
from jaxserve.models.config import ModelConfig
from jaxserve.models.decoder import init_kv_caches
from jaxserve.models.loader import load_model

LLAMA3_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)


def _layout(dtype) -> KVLayout:
    cfg = ModelConfig.from_hf(LLAMA3_8B)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("model",))
    return KVLayout.of(cfg, Placement(mesh, dict(DEFAULT_RULES), cfg), 16, dtype)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_a_byte_budget_holds_194x_the_bf16_pages_at_llama3_8b_shapes(dtype):
    bf16, q8 = _layout(jnp.bfloat16), _layout(dtype)
    assert bf16.token_bytes == 32 * 2 * 8 * 128 * 2
    assert q8.token_bytes == 32 * 2 * 8 * (128 + 4)
    step = StepMemory(temp_bytes=1 << 30, state_bytes=1 << 20)
    free = 60 << 30                                             # an H100's HBM less an 8B model in bf16
    pages = [kv_pages_for(free, memory_fraction=0.9, step=step, page_bytes=x.page_bytes, useful_pages=10 ** 9)
             for x in (bf16, q8)]
    assert pages[1] / pages[0] == pytest.approx(256 / 132, rel=1e-3)
    assert "scales included" in q8.describe(pages[1]) and "scales" not in bf16.describe(pages[0])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvq-profile-model")
    write_engine_test_model(path)
    return load_model(str(path), dtype="float32", attention_backend="xla").model


def test_profile_takes_an_8bit_cache_spec_and_the_step_donates_pages_and_scales(model):
    shapes = StepShapes((32,), (4,), 4)
    spec = jax.eval_shape(lambda: init_kv_caches(model.cfg, 2, 16, jnp.int8))
    assert isinstance(spec, QuantizedKV) and spec.scales.shape == spec.pages.shape[:-1]
    step = profile_step_memory(model, spec, shapes=shapes, page_size=16, max_pages_per_seq=32, num_logprobs=1)
    assert step.temp_bytes > 0
    kv = init_kv_caches(model.cfg, 64, 16, jnp.int8)
    runner = ModelRunner(model, kv, page_size=16, max_model_len=512, shapes=shapes, block_table_fn=lambda r: [],
                         max_logprobs=1)
    s = shapes.seqs(32)
    inp = BodyInputs(np.zeros(32, np.int32), np.zeros(s + 1, np.int32), np.full(s, 4, np.int32),
                     np.zeros(1, np.int32), np.zeros(4, np.int32))
    cells = Cells(*(np.zeros(CELL_BUCKET, np.int32) for _ in range(4)))
    stats = runner._body.lower(runner.params, runner.kv_caches, runner.state, inp, cells).compile().memory_analysis()
    kv_bytes = runner.kv_caches.nbytes
    assert kv_bytes == kv.pages.size + 4 * kv.scales.size
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(runner.state))
    assert stats.alias_size_in_bytes >= kv_bytes + state_bytes  # pages and scales updated in place
