"""worker.spec_decode's acceptance on the device against per-group oracles: greedy prefix
acceptance, identity with the plain sampler when nothing is proposed, and the rejection
sampler's output distribution (chi-square, fixed seeds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.worker.sampler import SamplingMetadata, sample
from jaxserve.worker.spec_decode import accept_tokens, processed_logits


def metadata(rows: int, *, temperature=0.0, top_k=0, top_p=1.0, seeds=None, steps=None) -> SamplingMetadata:
    f = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (rows,))  # noqa: E731
    return SamplingMetadata(
        temperature=f(temperature, jnp.float32), top_k=f(top_k, jnp.int32), top_p=f(top_p, jnp.float32),
        min_p=f(0.0, jnp.float32), repetition_penalty=f(1.0, jnp.float32), presence_penalty=f(0.0, jnp.float32),
        frequency_penalty=f(0.0, jnp.float32), seeds=f(0 if seeds is None else seeds, jnp.int32),
        sample_index=f(0, jnp.int32), steps=f(0 if steps is None else steps, jnp.int32),
        bias_token_ids=jnp.full((rows, 2), -1, jnp.int32), bias_values=jnp.zeros((rows, 2), jnp.float32),
        row_slots=f(0, jnp.int32), want_logprobs=f(False, jnp.bool_))


def run_accept(logits, md, draft, num_draft):
    vocab = logits.shape[-1]
    pm, oc = jnp.zeros((1, vocab), jnp.bool_), jnp.zeros((1, vocab), jnp.int32)
    x, filtered = processed_logits(jnp.asarray(logits), md, pm, oc, None)
    tokens, acc = jax.jit(accept_tokens)(x, filtered, md, jnp.asarray(draft), jnp.asarray(num_draft))
    return np.asarray(tokens), np.asarray(acc)


def test_greedy_accepts_the_longest_matching_prefix_plus_the_bonus():
    rng = np.random.default_rng(0)
    g, k, v = 64, 4, 11
    c = k + 1
    logits = rng.normal(size=(g * c, v)).astype(np.float32)
    argmax = logits.argmax(-1).reshape(g, c)
    num_draft = rng.integers(0, k + 1, g).astype(np.int32)
    draft = np.full((g, k), -1, np.int32)
    for i in range(g):  # a matching prefix of random length, then a random (often wrong) token
        m = rng.integers(0, num_draft[i] + 1)
        draft[i, :m] = argmax[i, :m]
        draft[i, m:num_draft[i]] = rng.integers(0, v, num_draft[i] - m)
    tokens, acc = run_accept(logits, metadata(g * c), draft, num_draft)
    for i in range(g):
        a = 0
        while a < num_draft[i] and draft[i, a] == argmax[i, a]:
            a += 1
        assert acc[i] == a
        assert tokens[i, :a + 1].tolist() == argmax[i, :a + 1].tolist()  # accepted proposals, then the bonus
        assert (tokens[i, a + 1:] == -1).all()


def test_without_proposals_every_row_gets_the_plain_samplers_token():
    rng = np.random.default_rng(1)
    g, k, v = 32, 3, 50
    c = k + 1
    logits = jnp.asarray(rng.normal(size=(g * c, v)) * 2, jnp.float32)
    temp = np.where(np.arange(g * c) % 3 == 0, 0.0, 0.8).astype(np.float32)
    md = metadata(g * c, temperature=temp, top_k=np.where(np.arange(g * c) % 2, 7, 0), top_p=0.9,
                  seeds=np.arange(g * c) // c + 5, steps=np.tile(np.arange(c), g) + 3)
    tokens, acc = run_accept(logits, md, np.full((g, k), -1, np.int32), np.zeros(g, np.int32))
    vocab = logits.shape[-1]
    plain = sample(logits, md, jnp.zeros((1, vocab), jnp.bool_), jnp.zeros((1, vocab), jnp.int32), num_logprobs=1)
    assert (acc == 0).all()
    assert tokens[:, 0].tolist() == np.asarray(plain.token_ids).reshape(g, c)[:, 0].tolist()


def chi_square_p(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Goodness of fit p-value; cells expecting < 5 are pooled."""
    n = observed.sum()
    expected = expected_probs * n
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    df = keep.sum() - 1
    return float(jax.scipy.special.gammaincc(df / 2, stat / 2))


@pytest.mark.parametrize("top_k", [0, 3])
def test_rejection_sampler_emits_the_target_distribution(top_k):
    """Per group: row 0 holds p0, row 1 holds p1, proposals d1 (likely under p0) and d2. The
    first emitted token must follow p0 exactly; the second, given the first accepted d1, p1."""
    rng = np.random.default_rng(2)
    g, k, v = 8192, 2, 6
    c = k + 1
    base = rng.normal(size=(c, v)).astype(np.float32) * 1.5
    logits = np.tile(base, (g, 1))
    d1 = int(np.argmax(base[0]))
    draft = np.tile(np.array([[d1, int(np.argsort(base[1])[-2])]], np.int32), (g, 1))
    md = metadata(g * c, temperature=1.0, top_k=top_k, seeds=np.arange(g * c) // c, steps=np.tile(np.arange(c), g))
    tokens, acc = run_accept(logits, md, draft, np.full(g, k, np.int32))

    def probs(row):
        x = base[row].astype(np.float64)
        if top_k:
            x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
        e = np.exp(x - x.max())
        return e / e.sum()

    assert chi_square_p(np.bincount(tokens[:, 0], minlength=v), probs(0)) >= 1e-3
    second = tokens[tokens[:, 0] == d1, 1]
    assert len(second) > 1000
    assert chi_square_p(np.bincount(second, minlength=v), probs(1)) >= 1e-3
    # the checks can fail: the same counts against a wrong distribution are rejected
    assert chi_square_p(np.bincount(tokens[:, 0], minlength=v), probs(1)) < 1e-3
    assert ((acc == 0) == (tokens[:, 0] != d1)).all()


def test_memory_profile_counts_the_verify_programs_rows(tmp_path):
    from engine_fixtures import write_engine_test_model
    from jaxserve.core.step_shapes import StepShapes
    from jaxserve.models.decoder import init_kv_caches
    from jaxserve.models.loader import load_model
    from jaxserve.worker.memory_profile import profile_step_memory

    write_engine_test_model(tmp_path)
    model = load_model(str(tmp_path), dtype="float32", attention_backend="reference").model
    kv = jax.eval_shape(lambda: init_kv_caches(model.cfg, 2, 16, np.float32))
    kw = dict(shapes=StepShapes((64,), (16,), 16), page_size=16, max_pages_per_seq=8, num_logprobs=1)
    plain = profile_step_memory(model, kv, **kw)
    spec = profile_step_memory(model, kv, num_speculative_tokens=4, **kw)
    assert spec.temp_bytes > plain.temp_bytes  # logits of 16 * 5 rows instead of 16


def test_penalties_count_the_proposals_before_each_row():
    """Row j's logits equal the plain sampler's penalties with d_1 .. d_j added to the output
    counts (numpy oracle of apply_penalties over the whole vocabulary)."""
    from jaxserve.worker.sampler import add_logit_bias, apply_penalties

    rng = np.random.default_rng(4)
    s, v, p, n = 24, 40, 4, 3
    logits = rng.normal(size=(s, v)).astype(np.float32) * 3
    counts = rng.integers(0, 3, (n, v)).astype(np.int32) * (rng.random((n, v)) < 0.2)
    prompt = rng.random((n, v)) < 0.3
    prefix = np.where(rng.random((s, p)) < 0.7, rng.integers(0, 8, (s, p)), -1).astype(np.int32)  # duplicates
    slots = rng.integers(0, n, s).astype(np.int32)
    md = dataclasses_replace(metadata(s), repetition_penalty=jnp.asarray(rng.choice([1.0, 1.3], s), jnp.float32),
                             presence_penalty=jnp.asarray(rng.choice([0.0, 0.4], s), jnp.float32),
                             frequency_penalty=jnp.asarray(rng.choice([0.0, 0.7], s), jnp.float32),
                             row_slots=jnp.asarray(slots))
    x, _ = processed_logits(jnp.asarray(logits), md, jnp.asarray(prompt), jnp.asarray(counts), None,
                            jnp.asarray(prefix))
    biased = add_logit_bias(jnp.asarray(logits), md.bias_token_ids, md.bias_values)
    for r in range(s):
        row_counts = counts[slots[r]] + np.bincount(prefix[r][prefix[r] >= 0], minlength=v)
        want = apply_penalties(biased[r:r + 1], jnp.asarray(prompt[slots[r]][None]), jnp.asarray(row_counts[None]),
                               md.repetition_penalty[r:r + 1], md.presence_penalty[r:r + 1],
                               md.frequency_penalty[r:r + 1])
        np.testing.assert_allclose(np.asarray(x[r]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)
