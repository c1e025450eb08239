"""Speculative verification on the device: the `verify(G)` program that replaces `sample(R)`
when speculative decoding is on, and the host side that reads its result.

Layout (fixed, so nothing recompiles): a step's sample rows become G groups of C = K + 1 rows
(K = num_speculative_tokens). Group g is what row g was without speculation (one sample of a
sequence); a speculating sequence fills rows j = 0..k_g of its group with the hidden states of
its chunk [last token, d_1 .. d_k] (k_g <= K proposals, InputBatch lays out `logits_rows`), and
every other group uses row 0 only. Row j's logits predict the token after input j, so draft
d_{j+1} is checked against row j:

    greedy row:    accept d_{j+1} while argmax(row j) == d_{j+1}
    sampled row:   accept d_{j+1} with probability p_j(d_{j+1}) (n-gram and greedy-draft proposals
                   are deterministic: q is one-hot, so min(1, p / q) = p); at the first rejection sample
                   from the residual max(0, p_j - onehot(d_{j+1})), renormalised
    all accepted:  the bonus token from row k_g (a plain sample / argmax)

p_j is exactly the distribution the plain sampler draws from (bias, penalties, token bitmask,
temperature, top-k, top-p, min-p, in its order; the penalties of row j count d_1 .. d_j as
generated, penalize_prefix), and the plain sample of row j uses the
plain sampler's key for step num_output + j, so a group with k_g = 0 gives the token the
plain sampler gives. The accept uniform and the residual draw use keys folded from the same
row key (1 and 2): every key decides at most one event whose outcome is kept, so the output
distribution is the target's (Leviathan et al., 2023; vLLM's rejection_sampler.py).

State updates (the next step reads them): last token = the group's last emitted token,
num_output += emitted, output counts += emitted tokens, and seq_lens rolls back by the
rejected proposals (the body set it to start + 1 + k_g).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxserve.sampling_params import GREEDY_TEMPERATURE_EPS
from jaxserve.worker.bitmask import apply_token_bitmask
from jaxserve.worker.sampler import (SamplingMetadata, _penalize, add_logit_bias, filter_logits, row_keys)

__all__ = ["VerifyInputs", "VerifyOutput", "SpecVerifier", "accept_tokens", "processed_logits"]

_ACCEPT, _RESIDUAL = 1, 2  # fold_in tags of the accept uniform and the residual draw


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyInputs:
    """G = rows bucket (groups), K = num_speculative_tokens, W = bitmask words."""

    row_slots: jax.Array  # i32[G]  slot of each group (sampling params, penalty state)
    row_sample_index: jax.Array  # i32[G]  sample of the request (folded into its PRNG key)
    row_owner: jax.Array  # bool[G]  the group's tokens are the slot's own next tokens
    draft: jax.Array  # i32[G, K]  proposed tokens, -1 past num_draft
    num_draft: jax.Array  # i32[G]  k_g in [0, K]
    bitmask: jax.Array  # i32[G, W]  allowed tokens of each group (all rows of a group share it)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyOutput:
    """C = K + 1 rows per group, L = num_logprobs. Logprob fields are zeros when no row wanted them."""

    token_ids: jax.Array  # i32[G, C]  emitted tokens; [:num_accepted + 1] are real, -1 after
    num_accepted: jax.Array  # i32[G]  accepted proposals (emitted = num_accepted + 1)
    sampled_logprobs: jax.Array  # f32[G, C]  raw logprob of each emitted token
    top_logprob_ids: jax.Array  # i32[G, C, L]
    top_logprobs: jax.Array  # f32[G, C, L]


def penalize_prefix(x: jax.Array, biased: jax.Array, md: SamplingMetadata, prompt_mask: jax.Array,
                    output_counts: jax.Array, prefix: jax.Array) -> jax.Array:
    """Penalties of the proposals before each row: row j of a group has generated d_1 .. d_j on
    top of its slot's output counts. x f32[S, V] is penalised with the slot's counts only; the
    logits of the prefix tokens prefix i32[S, P] (-1 padded) are recomputed from the biased
    logits with their counts raised (apply_penalties' formula on those entries only)."""
    penalised = ((md.repetition_penalty != 1.0) | (md.presence_penalty != 0.0) | (md.frequency_penalty != 0.0))

    def on(x):
        rows = jnp.arange(x.shape[0])[:, None]
        tok = jnp.maximum(prefix, 0)  # [S, P]
        added = jnp.sum((prefix[:, :, None] == prefix[:, None, :]) & (prefix[:, None, :] >= 0), -1)  # [S, P]
        sl = md.row_slots[:, None]
        counts = (output_counts[sl, tok] + added).astype(jnp.float32)
        seen = prompt_mask[sl, tok] | (counts > 0)
        b = biased[rows, tok]
        r = md.repetition_penalty[:, None]
        new = jnp.where(seen, jnp.where(b > 0, b / r, b * r), b)
        new = new - md.frequency_penalty[:, None] * counts - md.presence_penalty[:, None] * (counts > 0)
        ids = jnp.where(prefix >= 0, prefix, x.shape[-1])  # padding: out of range, dropped
        return x.at[rows, ids].set(new, mode="drop")

    return lax.cond(jnp.any(penalised & jnp.any(prefix >= 0, -1)), on, lambda x: x, x)


def processed_logits(logits: jax.Array, md: SamplingMetadata, prompt_mask: jax.Array, output_counts: jax.Array,
                     bitmask: jax.Array | None, prefix: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The plain sampler's stages before its choice (worker.sampler.sample, same order):
    logits f32[S, V] -> (x: biased, penalised, masked f32[S, V]; filtered: x / temperature
    after top-k, top-p, min-p, -inf outside; greedy rows neutral). prefix i32[S, P]: each row's
    proposals before it, counted by the penalties (penalize_prefix)."""
    biased = add_logit_bias(logits.astype(jnp.float32), md.bias_token_ids, md.bias_values.astype(jnp.float32))
    x = _penalize(biased, md, prompt_mask, output_counts)
    if prefix is not None:
        x = penalize_prefix(x, biased, md, prompt_mask, output_counts, prefix)
    if bitmask is not None:
        x = apply_token_bitmask(x, bitmask)
    greedy = md.temperature < GREEDY_TEMPERATURE_EPS
    scaled = x / jnp.where(greedy, 1.0, md.temperature)[:, None]
    filtered = filter_logits(scaled, jnp.where(greedy, 0, md.top_k), jnp.where(greedy, 1.0, md.top_p),
                             jnp.where(greedy, 0.0, md.min_p))
    return x, filtered


def accept_tokens(x: jax.Array, filtered: jax.Array, md: SamplingMetadata, draft: jax.Array,
                  num_draft: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy / rejection-sampling acceptance of G groups of C = K + 1 rows.

    x, filtered f32[G * C, V] (processed_logits); md per row [G * C]; draft i32[G, K];
    num_draft i32[G]. Returns (tokens i32[G, C], -1 past the emitted ones; num_accepted i32[G]).
    """
    g, k = draft.shape
    c = k + 1
    greedy = md.temperature < GREEDY_TEMPERATURE_EPS  # [G * C]
    argmax = jnp.argmax(x, axis=-1).astype(jnp.int32)
    in_draft = jnp.arange(k)[None, :] < num_draft[:, None]  # [G, K]
    d_rows = jnp.concatenate([jnp.where(in_draft, draft, 0), jnp.zeros((g, 1), jnp.int32)], 1).reshape(-1)  # [G*C]

    def greedy_only(_):
        return argmax, argmax == d_rows, argmax

    def with_sampling(_):
        keys = row_keys(md.seeds, md.sample_index, md.steps)  # [G * C]
        plain = jnp.where(greedy, argmax, jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32))
        probs = jax.nn.softmax(filtered, axis=-1)
        p_draft = jnp.take_along_axis(probs, d_rows[:, None], axis=-1)[:, 0]
        u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _ACCEPT)))(keys)
        accept = jnp.where(greedy, argmax == d_rows, u < p_draft)
        residual_logits = jnp.where(jnp.arange(x.shape[-1])[None, :] == d_rows[:, None], -jnp.inf, filtered)
        residual_keys = jax.vmap(lambda key: jax.random.fold_in(key, _RESIDUAL))(keys)
        residual = jax.vmap(jax.random.categorical)(residual_keys, residual_logits).astype(jnp.int32)
        return plain, accept, jnp.where(greedy, argmax, residual)

    plain, accept, residual = lax.cond(jnp.all(greedy), greedy_only, with_sampling, None)
    accept = accept.reshape(g, c)[:, :k] & in_draft  # [G, K]
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)  # [G]
    plain, residual = plain.reshape(g, c), residual.reshape(g, c)
    at = num_accepted[:, None]
    last = jnp.where(num_accepted < num_draft, jnp.take_along_axis(residual, at, 1)[:, 0],
                     jnp.take_along_axis(plain, at, 1)[:, 0])  # [G] token at row num_accepted
    j = jnp.arange(c)[None, :]
    draft_c = jnp.concatenate([draft, jnp.full((g, 1), -1, jnp.int32)], 1)  # [G, C]
    tokens = jnp.where(j < at, draft_c, jnp.where(j == at, last[:, None], -1))
    return tokens, num_accepted


def _logprobs(raw: jax.Array, tokens: jax.Array, want: jax.Array, k: int):
    """raw f32[S, V], tokens i32[S] (-1: none) -> (logprob of the token [S], top ids [S, k], top logprobs [S, k])."""
    def on(x, t):
        lp = jax.nn.log_softmax(x, axis=-1)
        sampled = jnp.take_along_axis(lp, jnp.maximum(t, 0)[:, None], axis=-1)[:, 0]
        top_lp, top_ids = lax.top_k(lp, k)
        return sampled, top_ids.astype(jnp.int32), top_lp

    def off(x, t):
        s = x.shape[0]
        return jnp.zeros((s,), jnp.float32), jnp.zeros((s, k), jnp.int32), jnp.zeros((s, k), jnp.float32)

    return lax.cond(jnp.any(want), on, off, raw, tokens)


def verify_step(graphdef, params, state, hidden: jax.Array, inp: VerifyInputs, *, num_logprobs: int):
    """LM head on G * C rows, acceptance, and the slot updates. hidden [max_num_seqs * C, D]."""
    model = nnx.merge(graphdef, params)
    g, k = inp.draft.shape
    c = k + 1
    raw = model.compute_logits(hidden[:g * c])  # [G * C, V]
    sl = jnp.repeat(inp.row_slots, c)  # [G * C]
    steps = state.num_output[sl] + jnp.tile(jnp.arange(c, dtype=jnp.int32), g)
    banning = (steps < state.min_tokens[sl])[:, None]
    bias = jnp.where(state.bias_is_ban[sl], jnp.where(banning, -jnp.inf, 0.0), state.bias_values[sl])
    md = SamplingMetadata(
        temperature=state.temperature[sl], top_k=state.top_k[sl], top_p=state.top_p[sl], min_p=state.min_p[sl],
        repetition_penalty=state.repetition_penalty[sl], presence_penalty=state.presence_penalty[sl],
        frequency_penalty=state.frequency_penalty[sl], seeds=state.seeds[sl],
        sample_index=jnp.repeat(inp.row_sample_index, c), steps=steps, bias_token_ids=state.bias_token_ids[sl],
        bias_values=bias, row_slots=sl, want_logprobs=state.want_logprobs[sl])
    j = jnp.arange(c)[:, None]  # row j of a group has generated its proposals d_1 .. d_j
    live = (jnp.arange(k)[None, None, :] < j[None]) & (jnp.arange(k)[None, None, :] < inp.num_draft[:, None, None])
    prefix = jnp.where(live, inp.draft[:, None, :], -1).reshape(g * c, k)  # [G * C, K]
    x, filtered = processed_logits(raw, md, state.prompt_mask, state.output_counts,
                                   jnp.repeat(inp.bitmask, c, axis=0), prefix)
    tokens, num_accepted = accept_tokens(x, filtered, md, inp.draft, inp.num_draft)  # [G, C], [G]
    lp = _logprobs(raw, tokens.reshape(-1), md.want_logprobs, num_logprobs)
    n = state.seq_lens.shape[0]
    own = jnp.where(inp.row_owner, inp.row_slots, n)  # groups without a slot of their own: dropped
    emitted = jnp.arange(c)[None, :] <= num_accepted[:, None]  # [G, C]
    own_rows = jnp.where(emitted, own[:, None], n)
    last = jnp.take_along_axis(tokens, num_accepted[:, None], 1)[:, 0]
    state = dataclasses.replace(
        state, last_tokens=state.last_tokens.at[own].set(last, mode="drop"),
        num_output=state.num_output.at[own].add(num_accepted + 1, mode="drop"),
        output_counts=state.output_counts.at[own_rows, jnp.maximum(tokens, 0)].add(1, mode="drop"),
        seq_lens=state.seq_lens.at[own].add(num_accepted - inp.num_draft, mode="drop"))
    out = VerifyOutput(tokens, num_accepted, lp[0].reshape(g, c), lp[1].reshape(g, c, -1), lp[2].reshape(g, c, -1))
    return state, out


@dataclasses.dataclass
class SpecHandle:
    """A dispatched verification step: device outputs, and how many groups are real."""

    result: VerifyOutput
    num_rows: int
    want_logprobs: bool


class SpecVerifier:
    """The runner's verify programs (one per rows bucket) and their host side."""

    def __init__(self, graphdef, *, num_speculative_tokens: int, num_logprobs: int, out_shardings=None):
        self.k = num_speculative_tokens
        self.jit = jax.jit(functools.partial(verify_step, graphdef, num_logprobs=num_logprobs), donate_argnums=(1,),
                           out_shardings=out_shardings)

    def inputs(self, row_slots: np.ndarray, row_sample_index: np.ndarray, row_owner: np.ndarray, bitmask,
               drafts: list[tuple[int, ...]]) -> VerifyInputs:
        """Host arrays of one step; drafts: the proposals of each real group, in row order."""
        g = row_slots.shape[0]
        draft = np.full((g, self.k), -1, np.int32)
        num = np.zeros(g, np.int32)
        for i, d in enumerate(drafts):
            if d:
                draft[i, :len(d)] = d
                num[i] = len(d)
        return VerifyInputs(row_slots, row_sample_index, row_owner, draft, num, bitmask)

    def dispatch(self, params, state, hidden, inp: VerifyInputs, num_rows: int, want_logprobs: bool):
        state, result = self.jit(params, state, hidden, inp)
        result.token_ids.copy_to_host_async()
        result.num_accepted.copy_to_host_async()
        if want_logprobs:
            for a in (result.sampled_logprobs, result.top_logprob_ids, result.top_logprobs):
                a.copy_to_host_async()
        return state, SpecHandle(result, num_rows, want_logprobs)

    @staticmethod
    def collect(handle: SpecHandle) -> list[list[tuple[int, tuple | None]]]:
        """Per real group, its emitted run [(token, logprobs or None)], where logprobs is
        (sampled logprob, top ids, top logprobs) with all num_logprobs entries."""
        r, n = handle.result, handle.num_rows
        tokens = np.asarray(r.token_ids)[:n]
        num = np.asarray(r.num_accepted)[:n] + 1
        if handle.want_logprobs:
            lp, ids, tops = (np.asarray(r.sampled_logprobs)[:n], np.asarray(r.top_logprob_ids)[:n],
                             np.asarray(r.top_logprobs)[:n])
            return [[(int(tokens[g, j]), (float(lp[g, j]), ids[g, j].tolist(), tops[g, j].tolist()))
                     for j in range(num[g])] for g in range(n)]
        return [[(int(t), None) for t in tokens[g, :num[g]]] for g in range(n)]
