"""The device bitmask against a numpy oracle (np.unpackbits), and the sampler with a mask:
only allowed tokens come out, all-ones rows are bitwise untouched, logprobs stay raw."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.worker.bitmask import allow_all, apply_token_bitmask, unpack_bitmask
from jaxserve.worker.sampler import SamplingMetadata, sample


def random_mask(rng: np.random.Generator, rows: int, vocab: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """(packed int32[rows, ceil(V/32)], bool[rows, V]) with bits beyond V set (must be ignored)."""
    allowed = rng.random((rows, vocab)) < p
    allowed[np.arange(rows), rng.integers(0, vocab, rows)] = True  # at least one token a row
    words = -(-vocab // 32)
    padded = np.ones((rows, words * 32), bool)
    padded[:, :vocab] = allowed
    packed = np.packbits(padded, axis=1, bitorder="little").view(np.int32)
    return packed, allowed


@pytest.mark.parametrize("vocab", [32, 1000, 1024, 50])
def test_unpack_matches_numpy(vocab):
    packed, allowed = random_mask(np.random.default_rng(vocab), 5, vocab, 0.3)
    np.testing.assert_array_equal(np.asarray(unpack_bitmask(jnp.asarray(packed), vocab)), allowed)


def test_apply_masks_and_leaves_all_ones_rows_bitwise():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 100)).astype(np.float32)
    packed, allowed = random_mask(rng, 4, 100, 0.2)
    packed[2] = -1
    allowed[2] = True
    out = np.asarray(jax.jit(apply_token_bitmask)(logits, packed))
    np.testing.assert_array_equal(out, np.where(allowed, logits, -np.inf))
    same = np.asarray(jax.jit(apply_token_bitmask)(logits, allow_all(4, 4)))
    assert same.tobytes() == logits.tobytes()
    with pytest.raises(ValueError, match="bitmask must be int32"):
        apply_token_bitmask(jnp.asarray(logits), jnp.zeros((4, 2), jnp.int32))


def _metadata(s: int, temperature: float) -> SamplingMetadata:
    f = lambda v, dt=jnp.float32: jnp.full((s,), v, dt)  # noqa: E731
    return SamplingMetadata(temperature=f(temperature), top_k=f(0, jnp.int32), top_p=f(1.0), min_p=f(0.0),
                            repetition_penalty=f(1.0), presence_penalty=f(0.0), frequency_penalty=f(0.0),
                            seeds=jnp.arange(s, dtype=jnp.int32), sample_index=f(0, jnp.int32),
                            steps=f(0, jnp.int32), bias_token_ids=jnp.full((s, 1), -1, jnp.int32),
                            bias_values=jnp.zeros((s, 1), jnp.float32), row_slots=jnp.arange(s, dtype=jnp.int32),
                            want_logprobs=jnp.ones((s,), bool))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_picks_only_allowed_tokens(temperature):
    rng = np.random.default_rng(1)
    s, v = 64, 300
    logits = rng.standard_normal((s, v)).astype(np.float32) * 3
    packed, allowed = random_mask(rng, s, v, 0.05)
    state = (jnp.zeros((s, v), bool), jnp.zeros((s, v), jnp.int32))
    run = jax.jit(lambda x, m: sample(x, _metadata(s, temperature), *state, num_logprobs=2, bitmask=m))
    out = run(logits, packed)
    tokens = np.asarray(out.token_ids)
    assert allowed[np.arange(s), tokens].all()
    if temperature == 0.0:  # greedy: the best allowed token
        np.testing.assert_array_equal(tokens, np.where(allowed, logits, -np.inf).argmax(-1))
    raw = jax.nn.log_softmax(logits, axis=-1)  # logprobs are those of the raw logits
    np.testing.assert_allclose(np.asarray(out.sampled_logprobs), np.asarray(raw)[np.arange(s), tokens], atol=1e-5)
    free = run(logits, allow_all(s, -(-v // 32)))
    unmasked = sample(jnp.asarray(logits), _metadata(s, temperature), *state, num_logprobs=2)
    np.testing.assert_array_equal(np.asarray(free.token_ids), np.asarray(unmasked.token_ids))
