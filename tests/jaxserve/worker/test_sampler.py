"""Sampler tests against oracles written here: numpy references and the old sort-based
top-k / top-p filter (never against the sampler's own helpers)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.worker.sampler import (SamplerOutput, SamplingMetadata, apply_penalties,
                                     filter_logits, filter_top_k_top_p, row_keys, sample)

jit_sample = jax.jit(sample, static_argnames=("num_logprobs",))
NEG_INF = float("-inf")
ROW_BUCKETS = (8, 32, 4096)  # few shapes -> few compilations
ROW_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0, pres=0.0,
                    freq=0.0, seed=0, index=0, step=0, logprobs=False)
PAD = dict(ROW_DEFAULTS, temperature=0.0)


def make_md(rows, s, b=4):
    """rows: dicts over ROW_DEFAULTS keys plus bias={id: value}, slot=int (default: index)."""
    rows = [dict(ROW_DEFAULTS, **r) for r in rows] + [PAD] * (s - len(rows))
    col = lambda key, dtype: jnp.asarray([r[key] for r in rows], dtype)  # noqa: E731
    bias_ids, bias_values = np.full((s, b), -1, np.int32), np.zeros((s, b), np.float32)
    for i, r in enumerate(rows):
        items = sorted(r.get("bias", {}).items())
        bias_ids[i, : len(items)] = [t for t, _ in items]
        bias_values[i, : len(items)] = [v for _, v in items]
    return SamplingMetadata(
        temperature=col("temperature", jnp.float32), top_k=col("top_k", jnp.int32),
        top_p=col("top_p", jnp.float32), min_p=col("min_p", jnp.float32),
        repetition_penalty=col("rep", jnp.float32), presence_penalty=col("pres", jnp.float32),
        frequency_penalty=col("freq", jnp.float32), seeds=col("seed", jnp.int32),
        sample_index=col("index", jnp.int32), steps=col("step", jnp.int32),
        bias_token_ids=jnp.asarray(bias_ids), bias_values=jnp.asarray(bias_values),
        row_slots=jnp.asarray([r.get("slot", i) for i, r in enumerate(rows)], jnp.int32),
        want_logprobs=col("logprobs", bool))


def make_state(n, vocab, prompts=None, outputs=None):
    """Per-slot penalty state from {slot: token list} dicts."""
    mask, counts = np.zeros((n, vocab), bool), np.zeros((n, vocab), np.int32)
    for slot, toks in (prompts or {}).items():
        mask[slot, list(toks)] = True
    for slot, toks in (outputs or {}).items():
        np.add.at(counts[slot], list(toks), 1)
    return jnp.asarray(mask), jnp.asarray(counts)


def run(logits, rows, *, s=None, state=None, num_logprobs=2):
    """Sample rows padded to a bucket, with NaN logits in every padding row."""
    logits = jnp.asarray(logits)
    s = s or next(b for b in ROW_BUCKETS if b >= len(rows))
    nan_rows = jnp.full((s - len(rows), logits.shape[1]), jnp.nan, logits.dtype)
    state = state or make_state(s, logits.shape[1])
    out = jit_sample(jnp.concatenate([logits, nan_rows]), make_md(rows, s), *state,
                     num_logprobs=num_logprobs)
    return jax.tree.map(lambda a: np.asarray(a)[: len(rows)], out)


def sort_filter_top_k_top_p(logits, top_k, top_p):
    """The old sort-based filter, kept verbatim as the oracle for the threshold search."""
    vocab = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
    last = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1) - 1, 0)
    p_cut = jnp.take_along_axis(desc, last[:, None], axis=-1)
    cutoff = jnp.where((top_p < 1.0)[:, None], jnp.maximum(kth, p_cut), kth)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


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


def test_penalties_and_bias_match_numpy():
    rng = np.random.default_rng(1)
    vocab, n_slots = 40, 16
    logits = rng.normal(scale=3.0, size=(4, vocab)).astype(np.float32)
    logits[0, 5] = logits[0].max() + 0.1  # the penalties move row 0's argmax
    specs = [  # (slot, prompt, output, repetition, presence, frequency, bias)
        (9, [1, 2, 2, 3], [3, 5, 5, 5, 7], 1.3, 0.5, 0.25, {}),
        (0, [], [0, 0, 39], 0.7, -1.0, 2.0, {39: -1.5}),
        (15, [4, 5, 6], [], 2.0, 0.0, 0.0, {1: 3.0, 2: NEG_INF}),
        (3, [9], [9, 10, 10], 1.0, 1.5, -0.5, {}),
    ]
    state = make_state(n_slots, vocab, {s[0]: s[1] for s in specs}, {s[0]: s[2] for s in specs})
    want = []
    for i, (slot, prompt, output, rep, pres, freq, bias) in enumerate(specs):
        biased = logits[i].astype(np.float64)
        for t, v in bias.items():
            biased[t] += v
        want.append(np_penalize(biased, prompt, output, rep, pres, freq))
    want = np.stack(want)
    slots = jnp.asarray([s[0] for s in specs])
    rep, pres, freq = (jnp.asarray([s[k] for s in specs], jnp.float32) for k in (3, 4, 5))
    no_bias = np.stack([np_penalize(logits[i], *s[1:6]) for i, s in enumerate(specs)])
    got = jax.jit(apply_penalties)(jnp.asarray(logits), state[0][slots], state[1][slots],
                                   rep, pres, freq)
    np.testing.assert_allclose(np.asarray(got), no_bias, rtol=1e-6, atol=1e-5)
    rows = [dict(temperature=0.0, slot=s[0], rep=s[3], pres=s[4], freq=s[5], bias=s[6])
            for s in specs]
    tokens = run(logits, rows, s=8, state=state).token_ids  # N = 16 slots > S = 8 rows
    np.testing.assert_array_equal(tokens, want.argmax(-1))
    assert (want.argmax(-1) != logits.argmax(-1)).any()


def test_greedy_is_argmax_and_tiny_temperature_or_top_k_1_equal_greedy():
    rng = np.random.default_rng(0)
    logits = (rng.permuted(np.tile(np.arange(50), (4, 1)), axis=1) * 0.1).astype(np.float32)
    rows = [dict(temperature=0.0), dict(temperature=0.9, top_k=1, seed=3),
            dict(temperature=2e-5, seed=4),  # just above the greedy threshold: sampled path
            dict(temperature=0.0, top_p=0.3, min_p=0.5)]
    out = run(logits, rows)
    assert isinstance(out, SamplerOutput)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    np.testing.assert_array_equal(run(bf16, rows).token_ids,
                                  np.asarray(bf16.astype(jnp.float32)).argmax(-1))


def test_neutral_penalties_are_bitwise_identity():
    rng = np.random.default_rng(6)
    logits = rng.normal(scale=4.0, size=(8, 33)).astype(np.float32)
    logits[0, :5] = [NEG_INF, 0.0, -0.0, 1e-30, -1e30]
    mask = jnp.asarray(rng.random((8, 33)) < 0.5)
    counts = jnp.asarray(rng.integers(0, 5, (8, 33)), jnp.int32)
    ones, zeros = jnp.ones(8, jnp.float32), jnp.zeros(8, jnp.float32)
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), mask, counts, ones, zeros,
                                              zeros))
    np.testing.assert_array_equal(got.view(np.uint32), logits.view(np.uint32))


def _primitives(jaxpr, nested=True):
    """Primitive names in a jaxpr; nested=True also walks cond branches and loop bodies."""
    names = set()
    for e in jaxpr.eqns:
        names.add(e.primitive.name)
        for v in e.params.values() if nested else ():
            for sub in v if isinstance(v, tuple) else (v,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    names |= _primitives(sub)
    return names


def test_costly_stages_only_inside_cond():
    s, v = 4, 16
    md = make_md([dict(seed=1, top_k=3, rep=1.2, logprobs=True)], s)
    jaxpr = jax.make_jaxpr(lambda x, m, pm, oc: sample(x, m, pm, oc, num_logprobs=2))(
        jnp.zeros((s, v)), md, *make_state(8, v)).jaxpr
    top, everything = _primitives(jaxpr, nested=False), _primitives(jaxpr)
    assert "cond" in top
    # Penalty gathers, the threshold loops, log_softmax / top-k run only inside branches.
    assert not top & {"gather", "scan", "while", "top_k", "sort", "exp", "log"}, top
    assert {"gather", "top_k"} <= everything and everything & {"scan", "while"}
    assert "sort" not in everything  # no vocabulary sort anywhere


def _random_filter_cases(rng, vocab, ties):
    """(logits f32[S, V], top_k, top_p) covering ties, -inf, extreme k and p, mixed on/off."""
    ks = [0, 1, 2, 5, vocab - 1, vocab, vocab + 7]
    ps = [1.0, 0.999999, 0.99, 0.5, 0.1, 1e-6, 1e-30]
    k = np.array([a for a in ks for _ in ps], np.int32)
    p = np.array([b for _ in ks for b in ps], np.float32)
    if ties:  # a handful of distinct values -> big groups of equal logits at the cut-offs
        logits = rng.integers(-4, 3, (k.size, vocab)).astype(np.float32) * 0.75
    else:
        logits = rng.normal(scale=2.0, size=(k.size, vocab)).astype(np.float32)
    ban = rng.random(logits.shape) < 0.3
    ban[:, 0] = False  # at least one finite logit per row
    ban[::3] = False
    ban[1::7, 1:] = True  # only one finite logit: every top-k > 1 reaches -inf
    logits = np.where(ban, np.float32(NEG_INF), logits)
    return logits, k, p


@pytest.mark.parametrize("ties", [True, False])
def test_threshold_search_matches_sort_oracle(ties):
    rng = np.random.default_rng(7 + ties)
    vocab = 48
    f_new, f_old = jax.jit(filter_top_k_top_p), jax.jit(sort_filter_top_k_top_p)
    for _ in range(5):
        logits, k, p = _random_filter_cases(rng, vocab, ties)
        p[rng.random(p.size) < 0.5] = rng.random() * 0.98 + 0.01
        args = jnp.asarray(logits), jnp.asarray(k), jnp.asarray(p)
        got, want = np.asarray(f_new(*args)), np.asarray(f_old(*args))
        for i in range(logits.shape[0]):
            np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(want[i]),
                                          err_msg=f"top_k={k[i]} top_p={p[i]}")
        np.testing.assert_array_equal(got, want)


def test_threshold_search_signed_zero_and_degenerate_top_p():
    logits = jnp.asarray([[1.0, 0.0, -0.0, -1.0], [0.0, -0.0, -0.0, -2.0],
                          [3.0, 3.0, NEG_INF, 1.0], [NEG_INF, 2.0, 2.0, 2.0]], jnp.float32)
    for k, p in [(2, 1.0), (1, 1.0), (0, 0.0), (3, 0.0), (0, 0.5)]:
        args = logits, jnp.full((4,), k, jnp.int32), jnp.full((4,), p, jnp.float32)
        got, want = filter_top_k_top_p(*args), sort_filter_top_k_top_p(*args)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"{k} {p}")


def test_filter_support_matches_numpy():
    rng = np.random.default_rng(2)
    vocab = 64
    cases = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (10, 0.8, 0.05),
             (3, 0.3, 0.9), (70, 0.95, 0.0), (1, 1.0, 0.0), (0, 0.01, 0.0), (0, 1.0, 1.0)]
    logits = rng.normal(scale=2.0, size=(len(cases), vocab)).astype(np.float32)
    logits[6, :8] = logits[6, 8]  # ties straddling cut-offs are kept
    k, p, m = (np.asarray(c) for c in zip(*cases))
    got = np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), jnp.asarray(k, jnp.int32),
                                            jnp.asarray(p, jnp.float32),
                                            jnp.asarray(m, jnp.float32)))
    for i, (top_k, top_p, min_p) in enumerate(cases):
        want = np_support(logits[i], top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(got[i]), want, err_msg=str(cases[i]))
        np.testing.assert_array_equal(got[i][want], logits[i][want])


def test_filters_never_sample_filtered_tokens():
    logits = np.log(np.array([0.3, 0.25, 0.2, 0.15, 0.07, 0.03], np.float32))
    cases = [dict(top_k=2), dict(top_p=0.5), dict(min_p=0.6), dict(top_k=4, top_p=0.9),
             dict(top_p=0.7, min_p=0.5)]
    n = 800
    rows = [dict(seed=s, **c) for c in cases for s in range(n)]
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
    rows = [dict(seed=s, step=s % 7, index=s % 3, **params) for s in range(n)]
    tokens = run(np.tile(logits, (n, 1)), rows).token_ids
    scaled = logits / params["temperature"]
    support = np_support(scaled, params.get("top_k", 0), params.get("top_p", 1.0), 0.0)
    probs = np_softmax(np.where(support, scaled, -np.inf))
    counts = np.bincount(tokens, minlength=len(logits)).astype(np.float64)
    assert counts[~support].sum() == 0
    # chi-square with df = |support| - 1 <= 5; 20.5 is the p = 0.001 critical value.
    assert chi_square(counts[support], probs[support]) < 20.5, (counts, probs * n)


def test_row_key_folds_seed_then_sample_index_then_step():
    keys = lambda s, i, t: np.asarray(jax.random.key_data(  # noqa: E731
        row_keys(jnp.asarray(s, jnp.int32), jnp.asarray(i, jnp.int32),
                 jnp.asarray(t, jnp.int32))))
    got = keys([5, 6, 5, 5], [1, 0, 0, 1], [0, 0, 1, 0])
    assert not (got[0] == got[1]).all()  # sample 1 of seed 5 != sample 0 of seed 6
    assert not (got[0] == got[2]).all()  # index and step are different folds
    np.testing.assert_array_equal(got[0], got[3])
    base = jax.random.key(5)
    want = jax.random.fold_in(jax.random.fold_in(base, 1), 0)
    np.testing.assert_array_equal(got[0], np.asarray(jax.random.key_data(want)))


def test_seeded_rows_reproducible_across_batches():
    rng = np.random.default_rng(3)
    vocab = 1000
    target = rng.normal(size=vocab).astype(np.float32)
    probe = [dict(seed=11), dict(seed=11, step=5), dict(seed=11, index=2, step=5),
             dict(seed=2**31 - 1, step=3)]
    alone = run(np.tile(target, (4, 1)), probe).token_ids
    others = [dict(seed=99, temperature=0.5, top_k=5), dict(temperature=0.0),
              dict(seed=7, top_p=0.9, pres=1.0), dict(seed=3, min_p=0.1, logprobs=True)]
    for pos in range(4):  # probe rows at different positions, neighbours and padding
        batch = others[:pos] + probe + others[pos:]
        logits = rng.normal(size=(len(batch), vocab)).astype(np.float32)
        logits[pos:pos + 4] = target
        got = run(logits, batch, s=8 + 24 * (pos % 2))
        np.testing.assert_array_equal(got.token_ids[pos:pos + 4], alone, err_msg=str(pos))


def test_different_steps_seeds_and_indices_give_different_draws():
    flat = np.zeros((20, 1000), np.float32)
    by_step = run(flat, [dict(seed=5, step=t) for t in range(20)]).token_ids
    by_seed = run(flat, [dict(seed=s) for s in range(20)]).token_ids
    by_index = run(flat, [dict(seed=5, index=i) for i in range(20)]).token_ids
    for draws in (by_step, by_seed, by_index):
        assert len(set(draws.tolist())) >= 18
    np.testing.assert_array_equal(by_step, run(flat, [dict(seed=5, step=t)
                                                      for t in range(20)]).token_ids)


def test_logprobs_are_raw_log_softmax_and_zero_when_unwanted():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=2.0, size=(3, 30)).astype(np.float32)
    rows = [dict(temperature=0.0, bias={0: 50.0}, logprobs=True),
            dict(seed=1, temperature=2.0, rep=1.5, logprobs=True),
            dict(seed=2, temperature=0.5, top_k=3)]
    state = make_state(8, 30, {1: [3, 4]}, {1: [5]})
    out = run(logits, rows, state=state, num_logprobs=5)
    want = np_log_softmax(logits)
    np.testing.assert_allclose(out.sampled_logprobs, want[np.arange(3), out.token_ids],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.top_logprob_ids, np.argsort(-want, axis=-1)[:, :5])
    np.testing.assert_allclose(out.top_logprobs, np.sort(want, axis=-1)[:, ::-1][:, :5],
                               rtol=1e-5, atol=1e-5)
    assert out.token_ids[0] == 0  # the bias steered sampling but not the logprobs
    assert out.top_logprob_ids.dtype == np.int32 and out.token_ids.dtype == np.int32
    quiet = run(logits, [dict(r, logprobs=False) for r in rows], state=state, num_logprobs=5)
    np.testing.assert_array_equal(quiet.token_ids, out.token_ids)
    assert quiet.top_logprobs.shape == (3, 5) and quiet.sampled_logprobs.shape == (3,)
    for field in ("sampled_logprobs", "top_logprob_ids", "top_logprobs"):
        assert not getattr(quiet, field).any(), field


def test_logit_bias_bans_and_boosts():
    logits = np.array([[5.0, 4.0, 3.0, 0.0]] * 3, np.float32)
    rows = [dict(temperature=0.0, bias={0: NEG_INF}), dict(temperature=0.0, bias={3: 10.0}),
            dict(temperature=0.0, bias={0: NEG_INF, 1: NEG_INF})]
    np.testing.assert_array_equal(run(logits, rows).token_ids, [1, 3, 2])
    n = 32
    banned = [dict(seed=s, temperature=5.0, bias={0: NEG_INF, 2: NEG_INF}) for s in range(n)]
    toks = run(np.tile(logits[0], (n, 1)), banned).token_ids
    assert set(toks.tolist()) == {1, 3}


def test_padding_rows_do_not_affect_real_rows():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 100)).astype(np.float32)
    rows = [dict(seed=1, top_k=10, logprobs=True), dict(temperature=0.0, pres=2.0)]
    out = {1: [int(logits[1].argmax())]}
    want = run(logits, rows, state=make_state(8, 100, outputs=out))  # 6 NaN padding rows
    got = run(logits, rows, s=32, state=make_state(32, 100, outputs=out))
    for field in ("token_ids", "sampled_logprobs", "top_logprob_ids", "top_logprobs"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert want.token_ids[1] != logits[1].argmax()  # the presence penalty applied


def test_shape_validation():
    md = make_md([dict()], 2)
    x = jnp.zeros((2, 16))
    with pytest.raises(ValueError, match=r"logits must be \[S=2, V\], got \(3, 16\)"):
        sample(jnp.zeros((3, 16)), md, *make_state(2, 16), num_logprobs=1)
    with pytest.raises(ValueError, match=r"prompt_mask must be \[N, V=16\], got \(2, 8\)"):
        sample(x, md, *make_state(2, 8), num_logprobs=1)
    with pytest.raises(ValueError, match=r"num_logprobs must be in \[1, 16\], got 0"):
        sample(x, md, *make_state(2, 16), num_logprobs=0)
