"""The step memory profile (what a step needs besides weights and KV pages) and the KV
budget arithmetic; the KV pages and the slot state are donated (aliased, not copied)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from engine_fixtures import write_engine_test_model
from jaxserve.core.step_shapes import StepShapes
from jaxserve.worker.input_batch import CELL_BUCKET, BodyInputs, Cells, init_slot_state
from jaxserve.worker.memory_profile import StepMemory, kv_pages_for, profile_step_memory
from jaxserve.worker.model_runner import ModelRunner, _body
from jaxserve.worker.prompt_logprobs import prompt_logprobs_program
from jaxserve.models.config import ModelConfig
from jaxserve.models.decoder import CausalLM, init_kv_caches
from jaxserve.models.loader import load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile-model")
    write_engine_test_model(path)
    return load_model(str(path), dtype="float32", attention_backend="reference").model


def kv_spec(model, pages=2):
    return jax.eval_shape(lambda: init_kv_caches(model.cfg, pages, 16, np.float32))


def test_temporaries_grow_with_the_largest_bucket(model):
    small = profile_step_memory(model, kv_spec(model), shapes=StepShapes((32,), (4,), 4), page_size=16,
                                max_pages_per_seq=32, num_logprobs=1)
    large = profile_step_memory(model, kv_spec(model), shapes=StepShapes((32, 512), (4, 64), 64), page_size=16,
                                max_pages_per_seq=32, num_logprobs=1)
    assert 0 < small.temp_bytes < large.temp_bytes
    assert small.state_bytes < large.state_bytes  # 5 vs 65 slots of [V] penalty state
    # The page count does not change the temporaries: the profile may use a 2-page cache.
    again = profile_step_memory(model, kv_spec(model, pages=64), shapes=StepShapes((32,), (4,), 4), page_size=16,
                                max_pages_per_seq=32, num_logprobs=1)
    assert again.temp_bytes == small.temp_bytes


def test_kv_budget_reserves_the_step_and_caps_at_useful_pages():
    step = StepMemory(temp_bytes=300, state_bytes=100)
    assert kv_pages_for(10_000, memory_fraction=0.5, step=step, page_bytes=100, useful_pages=1000) == 46
    assert kv_pages_for(10_000, memory_fraction=1.0, step=step, page_bytes=100, useful_pages=20) == 20
    assert kv_pages_for(300, memory_fraction=1.0, step=step, page_bytes=100, useful_pages=20) == 0


def test_kv_pages_and_slot_state_are_donated_in_place(model):
    shapes = StepShapes((32,), (4,), 4)
    kv = init_kv_caches(model.cfg, 64, 16, np.float32)
    runner = ModelRunner(model, kv, page_size=16, max_model_len=512, shapes=shapes, block_table_fn=lambda r: [],
                         max_logprobs=1)
    s = shapes.seqs(32)
    inp = BodyInputs(np.zeros(32, np.int32), np.zeros(s + 1, np.int32), np.full(s, 4, np.int32),
                     np.zeros(1, np.int32), np.zeros(4, np.int32))
    cells = Cells(*(np.zeros(CELL_BUCKET, np.int32) for _ in range(4)))
    stats = runner._body.lower(runner.params, runner.kv_caches, runner.state, inp, cells).compile().memory_analysis()
    kv_bytes = sum(a.nbytes for a in jax.tree.leaves(runner.kv_caches))
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(runner.state))
    assert stats.alias_size_in_bytes >= kv_bytes + state_bytes  # updated in place: peak memory does not double


def test_prompt_logprob_program_and_all_rows_are_reserved():
    """The body's [T, D] rows live through the prompt-logprob program: both count, with that
    program's temporaries (LM head over T rows), unless enable_prompt_logprobs is off. A wide
    vocabulary makes that program the largest, so the reserve must be its."""
    cfg = ModelConfig(model_type="llama", vocab_size=16384, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=512, sliding_windows=(None,))
    wide = CausalLM(cfg)
    shapes = StepShapes((32, 256), (4,), 4)
    kw = dict(shapes=shapes, page_size=16, max_pages_per_seq=16, num_logprobs=5)
    on = profile_step_memory(wide, kv_spec(wide), prompt_logprobs=True, **kw)
    off = profile_step_memory(wide, kv_spec(wide), prompt_logprobs=False, **kw)
    t, d = 256, cfg.hidden_size
    rows = t * d * 4  # float32 [T, D]
    graphdef, params = nnx.split(wide)
    plp = jax.jit(functools.partial(prompt_logprobs_program, graphdef, num_logprobs=5)).lower(
        params, jax.ShapeDtypeStruct((t, d), np.float32), jax.ShapeDtypeStruct((t,), np.int32)).compile()
    plp_temp = plp.memory_analysis().temp_size_in_bytes
    assert plp_temp >= 256 * cfg.vocab_size * 4  # one block of [256, V] float32 logits
    # the body alone (enable_prompt_logprobs off) reserves its temporaries and the [T, D] rows
    s = shapes.seqs(t)
    state = jax.eval_shape(lambda: init_slot_state(shapes.max_num_seqs + 1, 16, cfg.vocab_size))
    inp = BodyInputs(np.zeros(t, np.int32), np.zeros(s + 1, np.int32), np.zeros(s, np.int32),
                     np.zeros(1, np.int32), np.zeros(shapes.max_num_seqs, np.int32))
    cells = Cells(*(np.zeros(CELL_BUCKET, np.int32) for _ in range(4)))
    body = jax.jit(functools.partial(_body, graphdef, page_size=16), donate_argnums=(1, 2)).lower(
        params, kv_spec(wide), state, inp, cells).compile()
    assert off.temp_bytes >= body.memory_analysis().temp_size_in_bytes + rows
    # on: the prompt-logprob program's temporaries with its [T, D] input, larger than the body's here
    assert on.temp_bytes == plp_temp + rows > off.temp_bytes
    assert off.state_bytes == on.state_bytes
