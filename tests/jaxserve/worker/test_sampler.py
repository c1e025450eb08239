"""Sampler tests against numpy oracles written here (not against the sampler's helpers)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.worker.sampler import (SamplerOutput, SamplingMetadata, SamplingRow, filter_logits,
                              penalize, sample)
from jaxserve.sampling_params import SamplingParams

jit_sample = jax.jit(sample, static_argnames=("apply_penalties", "num_logprobs"))
NEG_INF = float("-inf")


def make_md(rows, num_rows_padded=None, penalty_len=None, bias_len=None):
    md = SamplingMetadata.from_rows(
        rows, num_rows_padded=num_rows_padded or len(rows),
        penalty_len=penalty_len or SamplingMetadata.required_penalty_len(rows),
        bias_len=bias_len or SamplingMetadata.required_bias_len(rows))
    return jax.tree.map(jnp.asarray, md)


ROW_BUCKETS = (8, 32, 4096)  # few shapes -> few compilations


def run(logits, rows, *, penalties=False, num_logprobs=0, num_rows_padded=None,
        penalty_len=8, bias_len=4):
    """Sample rows padded to a bucket, with NaN logits in every padding row."""
    logits = jnp.asarray(logits)
    s = num_rows_padded or next(b for b in ROW_BUCKETS if b >= len(rows))
    nan_rows = jnp.full((s - len(rows), logits.shape[1]), jnp.nan, logits.dtype)
    out = jit_sample(jnp.concatenate([logits, nan_rows]), make_md(rows, s, penalty_len, bias_len),
                     apply_penalties=penalties, num_logprobs=num_logprobs)
    return jax.tree.map(lambda a: np.asarray(a)[: len(rows)], out)


def row(seed=0, step=0, prompt=(), output=(), extra_bias=None, **params):
    return SamplingRow(SamplingParams(**params), seed, step, list(prompt), list(output),
                       extra_bias)


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_penalize(logits, prompt, output, rep, pres, freq):
    out = np.asarray(logits, np.float64).copy()
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t, c in collections.Counter(output).items():
        out[t] -= freq * c + pres
    return out


def np_support(logits, top_k, top_p, min_p):
    """Tokens that survive top-k -> top-p -> min-p (ties at a cut-off kept)."""
    lg = np.asarray(logits, np.float64)
    keep = np.ones(lg.shape, bool)
    if top_k > 0:
        keep &= lg >= np.sort(lg)[::-1][min(top_k, lg.size) - 1]
    if top_p < 1:
        p, mass, cut = np_softmax(np.where(keep, lg, -np.inf)), 0.0, None
        for t in np.argsort(-lg, kind="stable"):
            if not keep[t] or mass >= top_p:
                break
            cut, mass = lg[t], mass + p[t]
        keep &= lg >= cut
    if min_p > 0:
        p = np_softmax(np.where(keep, lg, -np.inf))
        keep &= p >= min_p * p.max()
    return keep


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    rows = [row(temperature=0.0), row(temperature=0.9, top_k=1), row(temperature=1e-6),
            row(temperature=0.0, top_p=0.3, min_p=0.5)]
    out = run(logits, rows)
    assert isinstance(out, SamplerOutput) and out.sampled_logprobs is None
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))
    bf16 = run(jnp.asarray(logits, jnp.bfloat16), rows).token_ids
    np.testing.assert_array_equal(bf16, np.asarray(jnp.asarray(logits, jnp.bfloat16)
                                                   .astype(jnp.float32)).argmax(-1))


def test_penalties_match_numpy():
    rng = np.random.default_rng(1)
    vocab = 40
    logits = rng.normal(scale=3.0, size=(4, vocab)).astype(np.float32)
    logits[0, 5] = logits[0].max() + 0.1  # the penalties move row 0's argmax
    specs = [  # (prompt, output, repetition, presence, frequency)
        ([1, 2, 2, 3], [3, 5, 5, 5, 7], 1.3, 0.5, 0.25),
        ([], [0, 0, 39], 0.7, -1.0, 2.0),
        ([4, 5, 6], [], 2.0, 0.0, 0.0),
        ([9], [9, 10, 10], 1.0, 1.5, -0.5),
    ]
    rows = [row(temperature=0.0, prompt=p, output=o, repetition_penalty=r,
                presence_penalty=pr, frequency_penalty=f) for p, o, r, pr, f in specs]
    md = make_md(rows)
    got = np.asarray(jax.jit(penalize)(jnp.asarray(logits), md))
    want = np.stack([np_penalize(logits[i], *s) for i, s in enumerate(specs)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    tokens = run(logits, rows, penalties=True).token_ids
    np.testing.assert_array_equal(tokens, want.argmax(-1))
    # apply_penalties=False (static) ignores them.
    np.testing.assert_array_equal(run(logits, rows).token_ids, logits.argmax(-1))
    assert (want.argmax(-1) != logits.argmax(-1)).any()


def test_filter_support_exact():
    rng = np.random.default_rng(2)
    vocab = 64
    cases = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (10, 0.8, 0.05),
             (3, 0.3, 0.9), (70, 0.95, 0.0), (1, 1.0, 0.0), (0, 0.01, 0.0), (0, 1.0, 1.0)]
    logits = rng.normal(scale=2.0, size=(len(cases), vocab)).astype(np.float32)
    logits[6, :8] = logits[6, 8]  # ties straddling cut-offs are kept
    k, p, m = (jnp.asarray(c) for c in zip(*cases))
    got = np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), k.astype(jnp.int32),
                                            p.astype(jnp.float32), m.astype(jnp.float32)))
    for i, (top_k, top_p, min_p) in enumerate(cases):
        want = np_support(logits[i], top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(got[i]), want, err_msg=str(cases[i]))
        np.testing.assert_array_equal(got[i][want], logits[i][want])


def test_filters_never_sample_filtered_tokens():
    logits = np.log(np.array([0.3, 0.25, 0.2, 0.15, 0.07, 0.03], np.float32))
    cases = [dict(top_k=2), dict(top_p=0.5), dict(min_p=0.6), dict(top_k=4, top_p=0.9),
             dict(top_p=0.7, min_p=0.5)]
    n = 800
    rows = [row(seed=s, temperature=1.0, **c) for c in cases for s in range(n)]
    tokens = run(np.tile(logits, (len(rows), 1)), rows).token_ids.reshape(len(cases), n)
    for c, toks in zip(cases, tokens):
        support = np_support(logits, c.get("top_k", 0), c.get("top_p", 1.0), c.get("min_p", 0.0))
        assert support[toks].all(), (c, np.unique(toks))
        assert set(np.unique(toks)) == set(np.flatnonzero(support)), c  # all reachable


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(temperature=1.5, top_k=3),
                                    dict(temperature=1.0, top_p=0.8)])
def test_empirical_distribution_matches_softmax(params):
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0, -1.5], np.float32)
    n = 4096
    rows = [row(seed=s, step=s % 7, **params) for s in range(n)]
    tokens = run(np.tile(logits, (n, 1)), rows).token_ids
    scaled = logits / params["temperature"]
    support = np_support(scaled, params.get("top_k", 0), params.get("top_p", 1.0), 0.0)
    probs = np_softmax(np.where(support, scaled, -np.inf))
    counts = np.bincount(tokens, minlength=len(logits)).astype(np.float64)
    assert counts[~support].sum() == 0
    # chi-square with df = |support| - 1 <= 5; 20.5 is the p = 0.001 critical value.
    assert chi_square(counts[support], probs[support]) < 20.5, (counts, probs * n)


def test_seeded_rows_reproducible_across_batches():
    rng = np.random.default_rng(3)
    vocab = 1000
    target = rng.normal(size=vocab).astype(np.float32)
    probe = [row(seed=s, step=t, temperature=1.0) for s, t in [(11, 0), (11, 5), (2**40, 3)]]
    alone = run(np.tile(target, (3, 1)), probe).token_ids
    others = [row(seed=99, temperature=0.5, top_k=5), row(temperature=0.0),
              row(seed=7, top_p=0.9, presence_penalty=1.0, output=[1, 2]),
              row(seed=3, min_p=0.1)]
    for pos in range(4):  # probe rows at different positions, neighbours and padding
        batch = others[:pos] + probe + others[pos:]
        logits = rng.normal(size=(len(batch), vocab)).astype(np.float32)
        logits[pos:pos + 3] = target
        got = run(logits, batch, penalties=pos % 2 == 1, num_rows_padded=8 + 24 * (pos % 2))
        np.testing.assert_array_equal(got.token_ids[pos:pos + 3], alone, err_msg=str(pos))


def test_different_steps_and_seeds_give_different_draws():
    flat = np.zeros((20, 1000), np.float32)
    by_step = run(flat, [row(seed=5, step=t) for t in range(20)]).token_ids
    by_seed = run(flat, [row(seed=s, step=0) for s in range(20)]).token_ids
    assert len(set(by_step.tolist())) >= 18 and len(set(by_seed.tolist())) >= 18
    again = run(flat, [row(seed=5, step=t) for t in range(20)]).token_ids
    np.testing.assert_array_equal(by_step, again)


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=2.0, size=(4, 30)).astype(np.float32)
    rows = [row(temperature=0.0, logit_bias={0: 50.0}),
            row(seed=1, temperature=2.0, repetition_penalty=1.5, prompt=[3, 4], output=[5]),
            row(seed=2, temperature=0.5, top_k=3)]
    out = run(logits[:3], rows, penalties=True, num_logprobs=5)
    want = np_log_softmax(logits[:3])
    np.testing.assert_allclose(out.sampled_logprobs,
                               want[np.arange(3), out.token_ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.top_logprob_ids, np.argsort(-want, axis=-1)[:, :5])
    np.testing.assert_allclose(out.top_logprobs, np.sort(want, axis=-1)[:, ::-1][:, :5],
                               rtol=1e-5, atol=1e-5)
    assert out.token_ids[0] == 0  # the bias steered sampling but not the logprobs
    assert out.top_logprob_ids.dtype == np.int32 and out.token_ids.dtype == np.int32


def test_logit_bias_bans_and_boosts():
    logits = np.array([[5.0, 4.0, 3.0, 0.0]] * 3, np.float32)
    rows = [row(temperature=0.0, extra_bias={0: NEG_INF}),
            row(temperature=0.0, logit_bias={3: 10.0}),
            row(temperature=0.0, logit_bias={0: 1.0}, extra_bias={0: NEG_INF, 1: NEG_INF})]
    np.testing.assert_array_equal(run(logits, rows).token_ids, [1, 3, 2])
    n = 32
    banned = [row(seed=s, temperature=5.0, extra_bias={0: NEG_INF, 2: NEG_INF})
              for s in range(n)]
    toks = run(np.tile(logits[0], (n, 1)), banned).token_ids
    assert set(toks.tolist()) == {1, 3}


def test_padding_rows_do_not_affect_real_rows():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 100)).astype(np.float32)
    rows = [row(seed=1, temperature=1.0, top_k=10), row(temperature=0.0)]
    want = run(logits, rows, num_logprobs=2)  # 6 NaN padding rows
    got = run(logits, rows, num_logprobs=2, num_rows_padded=32, penalty_len=16, bias_len=8)
    for field in ("token_ids", "sampled_logprobs", "top_logprob_ids", "top_logprobs"):
        np.testing.assert_array_equal(getattr(got, field)[:2], getattr(want, field))


def test_sort_only_inside_cond():
    md = make_md([row(seed=1, top_k=3)], num_rows_padded=2)
    jaxpr = jax.make_jaxpr(lambda x, m: sample(x, m, apply_penalties=True, num_logprobs=0))(
        jnp.zeros((2, 16)), md).jaxpr
    top_level = {e.primitive.name for e in jaxpr.eqns}
    assert "sort" not in top_level and "cond" in top_level
    assert "sort" in str(jaxpr)


def test_from_rows_layout_and_validation():
    rows = [row(seed=-1, step=3, temperature=0.5, top_k=1, prompt=[1, 2], output=[3]),
            row(seed=2**31 + 5, prompt=[1, 2, 3, 4], output=[5, 6], repetition_penalty=1.2,
                logit_bias={7: 2.0}, extra_bias={7: 1.0, 2: NEG_INF}),
            row(prompt=[1, 2, 3], output=[4, 5, 6], frequency_penalty=0.1)]
    assert SamplingMetadata.required_penalty_len(rows) == 4
    assert SamplingMetadata.required_bias_len(rows) == 2
    md = SamplingMetadata.from_rows(rows, num_rows_padded=4, penalty_len=5, bias_len=3)
    np.testing.assert_array_equal(md.temperature, [0.0, 1.0, 1.0, 0.0])  # top_k=1 is greedy
    np.testing.assert_array_equal(md.seeds, [2**31 - 1, 5, 0, 0])
    np.testing.assert_array_equal(md.steps, [3, 0, 0, 0])
    np.testing.assert_array_equal(md.prompt_token_ids[:, :4],
                                  [[-1] * 4, [1, 2, 3, 4], [-1] * 4, [-1] * 4])
    np.testing.assert_array_equal(md.output_token_ids[:, :3],
                                  [[-1] * 3, [5, 6, -1], [4, 5, 6], [-1] * 3])
    np.testing.assert_array_equal(md.bias_token_ids[1], [2, 7, -1])
    np.testing.assert_array_equal(md.bias_values[1], [NEG_INF, 3.0, 0.0])
    assert md.top_k.dtype == np.int32 and md.top_p.dtype == np.float32
    with pytest.raises(ValueError, match="num_rows_padded must be >= 3 rows, got 2"):
        SamplingMetadata.from_rows(rows, num_rows_padded=2, penalty_len=4, bias_len=2)
    with pytest.raises(ValueError, match="penalty_len must be >= 4, got 3"):
        SamplingMetadata.from_rows(rows, num_rows_padded=3, penalty_len=3, bias_len=2)
    with pytest.raises(ValueError, match="bias_len must be >= 2, got 1"):
        SamplingMetadata.from_rows(rows, num_rows_padded=3, penalty_len=4, bias_len=1)
