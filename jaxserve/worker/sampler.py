"""On-device sampling: logits [S, V] -> token ids [S] plus top-K logprobs, fixed shapes.

The sampler is its own jitted program per row bucket S (V = vocabulary, K = num_logprobs,
static). Its metadata is built on the device from the persistent slot state; the penalty
state lives per slot (N slots >= S rows) and each row names the slot it reads.

Flow of `sample` (same order as vLLM); every stage that costs [S, V] work beyond a single
elementwise pass sits behind a `lax.cond` that is false unless some row asked for it:

    raw logits (f32[S, V])
      -> + logit bias            scatter-add of [S, B] entries (the engine bans EOS with -inf)
      -> penalties               cond(any row penalised): gather prompt_mask / output_counts
                                 [N, V] -> [S, V] by row_slots; repetition over prompt+output,
                                 presence / frequency over output counts
      -> cond(all rows greedy):  argmax only
         else: greedy rows argmax; other rows / temperature
               -> top-k, top-p   cond(any sampled row uses them): threshold search, no sort
               -> min-p          cond(any sampled row uses it)
               -> categorical(row key)
    logprobs                     cond(any row wants them): log_softmax(raw) and top-K;
                                 zeros otherwise (shapes never change)

top-k / top-p find their cut-off by bisection over the monotone uint32 bit pattern of the
f32 logits: 32 passes of a count (top-k) or masked probability sum (top-p) over V per row,
no sort. The kept set is a function of the values alone (ties at a cut-off are all kept).

A row's PRNG key is fold_in(fold_in(key(seed), sample_index), step): its tokens depend only
on (seed, sample_index, step), never on the batch around it, and sample k of seed s differs
from sample 0 of seed s + k.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.sampling_params import GREEDY_TEMPERATURE_EPS
from jaxserve.worker.bitmask import apply_token_bitmask

SEED_MODULUS = 2**31  # host seeds are reduced mod this to fit int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Per padded row; S rows, B bias entries per row. Padding rows: greedy, neutral."""

    temperature: jax.Array  # f32[S]; < GREEDY_TEMPERATURE_EPS -> greedy
    top_k: jax.Array  # i32[S]; 0 -> off
    top_p: jax.Array  # f32[S]; 1 -> off
    min_p: jax.Array  # f32[S]; 0 -> off
    repetition_penalty: jax.Array  # f32[S]; 1 -> off
    presence_penalty: jax.Array  # f32[S]; 0 -> off
    frequency_penalty: jax.Array  # f32[S]; 0 -> off
    seeds: jax.Array  # i32[S]
    sample_index: jax.Array  # i32[S]; which of the request's n samples this row is
    steps: jax.Array  # i32[S]; tokens this sample generated before this one
    bias_token_ids: jax.Array  # i32[S, B], -1 padded
    bias_values: jax.Array  # f32[S, B]; added to the logits (may be -inf)
    row_slots: jax.Array  # i32[S]; the slot of the penalty state each row reads
    want_logprobs: jax.Array  # bool[S]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """One token per row; logprob fields are zeros when no row wanted logprobs."""

    token_ids: jax.Array  # i32[S]
    sampled_logprobs: jax.Array  # f32[S], raw logprob of token_ids
    top_logprob_ids: jax.Array  # i32[S, K], descending logprob
    top_logprobs: jax.Array  # f32[S, K]


def add_logit_bias(logits: jax.Array, bias_token_ids: jax.Array,
                   bias_values: jax.Array) -> jax.Array:
    """logits f32[S, V] + bias at (row, bias_token_ids[row, j]); -1 ids ignored."""
    rows = jnp.arange(logits.shape[0])[:, None]
    # -1 pads go out of range and are dropped (a bare -1 would wrap to V - 1).
    ids = jnp.where(bias_token_ids < 0, logits.shape[-1], bias_token_ids)
    return logits.at[rows, ids].add(bias_values, mode="drop")


def apply_penalties(logits: jax.Array, prompt_mask_rows: jax.Array,
                    output_counts_rows: jax.Array, rep: jax.Array, pres: jax.Array,
                    freq: jax.Array) -> jax.Array:
    """Repetition (vLLM: over prompt+output), then presence / frequency (output only).

    logits f32[S, V]; prompt_mask_rows bool[S, V]; output_counts_rows i32[S, V];
    rep / pres / freq f32[S]. Neutral values (1, 0, 0) leave a row bitwise unchanged.
    """
    seen = prompt_mask_rows | (output_counts_rows > 0)
    r = rep[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    counts = output_counts_rows.astype(jnp.float32)
    return logits - freq[:, None] * counts - pres[:, None] * (counts > 0)


def _penalize(logits: jax.Array, md: SamplingMetadata, prompt_mask: jax.Array,
              output_counts: jax.Array) -> jax.Array:
    penalised = ((md.repetition_penalty != 1.0) | (md.presence_penalty != 0.0)
                 | (md.frequency_penalty != 0.0))

    def on(x, pm, oc):  # the only place the [N, V] state is read
        return apply_penalties(x, pm[md.row_slots], oc[md.row_slots], md.repetition_penalty,
                               md.presence_penalty, md.frequency_penalty)

    return lax.cond(jnp.any(penalised), on, lambda x, pm, oc: x, logits, prompt_mask,
                    output_counts)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """f32 -> u32 with the same order (x <= y iff key(x) <= key(y)) for non-NaN x."""
    x = jnp.where(x == 0, 0.0, x)  # -0.0 == 0.0 as floats, so one key for both
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key_where(pred, num_rows: int) -> jax.Array:
    """Per row, the largest c in u32 with pred(c) true, for pred true on a down-set.

    pred maps u32[S, 1] candidates to bool[S]. Builds c bit by bit from the top: 32 passes.
    Rows where pred(0) is false get 0.
    """
    def step(i, ans):
        cand = ans | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(pred(cand[:, None]), cand, ans)

    return lax.fori_loop(0, 32, step, jnp.zeros((num_rows,), jnp.uint32))


def _top_k_key(keys: jax.Array, top_k: jax.Array) -> jax.Array:
    """u32[S]: key of the k-th largest logit (the smallest where top_k is off)."""
    vocab = keys.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    return _largest_key_where(lambda c: jnp.sum(keys >= c, axis=-1) >= k, keys.shape[0])


def _top_p_key(logits: jax.Array, keys: jax.Array, kth: jax.Array,
               top_p: jax.Array) -> jax.Array:
    """u32[S]: smallest key whose strictly-greater mass (after top-k) is < top_p."""
    probs = jax.nn.softmax(jnp.where(keys >= kth[:, None], logits, -jnp.inf), axis=-1)
    reaches = lambda c: jnp.sum(jnp.where(keys > c, probs, 0.0), axis=-1) >= top_p  # noqa: E731
    last_reaching = _largest_key_where(reaches, keys.shape[0])
    top = jnp.max(keys, axis=-1)
    # +1 is the first key whose mass before it is < top_p; the maximum is always kept.
    return jnp.minimum(last_reaching, top - 1) + 1


def filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set tokens outside top-k, then outside top-p, to -inf, without sorting.

    logits f32[S, V] (temperature applied, may hold -inf, no NaN); top_k i32[S] (0 = off);
    top_p f32[S] (1 = off). Ties at a cut-off are all kept (as vLLM's top-k): top-k keeps
    logits >= the k-th largest; top-p keeps the smallest descending prefix whose
    probability (after top-k) reaches top_p, extended to every token equal to its last
    logit; the largest logit is always kept. Each search runs only if some row uses it.
    """
    keys = _ordered_keys(logits)
    s = logits.shape[0]
    kth = lax.cond(jnp.any(top_k > 0), lambda: _top_k_key(keys, top_k),
                   lambda: jnp.zeros((s,), jnp.uint32))
    use_p = top_p < 1.0
    p_key = lax.cond(jnp.any(use_p), lambda: _top_p_key(logits, keys, kth, top_p),
                     lambda: jnp.zeros((s,), jnp.uint32))
    cutoff = jnp.where(use_p, jnp.maximum(kth, p_key), kth)
    return jnp.where(keys >= cutoff[:, None], logits, -jnp.inf)


def filter_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keep tokens with prob >= min_p * max prob, i.e. logit >= max + log(min_p)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits >= top + jnp.log(min_p)[:, None], logits, -jnp.inf)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  min_p: jax.Array) -> jax.Array:
    """top-k -> top-p -> min-p on temperature-scaled logits f32[S, V]; filtered = -inf.

    Each filter is skipped (lax.cond) when no row uses it. Callers neutralise greedy rows'
    parameters first when those rows do not matter.
    """
    logits = lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)),
                      lambda x: filter_top_k_top_p(x, top_k, top_p), lambda x: x, logits)
    return lax.cond(jnp.any(min_p > 0.0), lambda x: filter_min_p(x, min_p), lambda x: x,
                    logits)


def row_keys(seeds: jax.Array, sample_index: jax.Array, steps: jax.Array) -> jax.Array:
    """Typed PRNG keys [S]: fold_in(fold_in(key(seed), sample_index), step) per row."""
    def one(seed, index, step):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), step)

    return jax.vmap(one)(seeds, sample_index, steps)


def _sample_random(logits: jax.Array, md: SamplingMetadata, greedy: jax.Array) -> jax.Array:
    scaled = logits / jnp.where(greedy, 1.0, md.temperature)[:, None]
    # Greedy rows must not switch a filter on, whatever they say.
    top_k = jnp.where(greedy, 0, md.top_k)
    top_p = jnp.where(greedy, 1.0, md.top_p)
    min_p = jnp.where(greedy, 0.0, md.min_p)
    scaled = filter_logits(scaled, top_k, top_p, min_p)
    keys = row_keys(md.seeds, md.sample_index, md.steps)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def _logprobs(raw: jax.Array, token_ids: jax.Array, want: jax.Array,
              k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    def on(x, t):
        logprobs = jax.nn.log_softmax(x, axis=-1)
        sampled = jnp.take_along_axis(logprobs, t[:, None], axis=-1)[:, 0]
        top_lp, top_ids = lax.top_k(logprobs, k)
        return sampled, top_ids.astype(jnp.int32), top_lp

    def off(x, t):
        s = x.shape[0]
        return (jnp.zeros((s,), jnp.float32), jnp.zeros((s, k), jnp.int32),
                jnp.zeros((s, k), jnp.float32))

    return lax.cond(jnp.any(want), on, off, raw, token_ids)


def _check_shapes(logits: jax.Array, md: SamplingMetadata, prompt_mask: jax.Array,
                  output_counts: jax.Array, num_logprobs: int) -> None:
    s = md.temperature.shape[0]
    if logits.ndim != 2 or logits.shape[0] != s:
        raise ValueError(f"logits must be [S={s}, V], got {logits.shape}")
    vocab = logits.shape[1]
    for name, a in (("prompt_mask", prompt_mask), ("output_counts", output_counts)):
        if a.ndim != 2 or a.shape[1] != vocab:
            raise ValueError(f"{name} must be [N, V={vocab}], got {a.shape}")
    if prompt_mask.shape != output_counts.shape:
        raise ValueError(f"output_counts must match prompt_mask {prompt_mask.shape}, "
                         f"got {output_counts.shape}")
    if md.bias_token_ids.shape != md.bias_values.shape or md.bias_values.shape[0] != s:
        raise ValueError(f"bias arrays must both be [S={s}, B], got "
                         f"{md.bias_token_ids.shape} and {md.bias_values.shape}")
    if not 1 <= num_logprobs <= vocab:
        raise ValueError(f"num_logprobs must be in [1, {vocab}], got {num_logprobs}")


def sample(logits: jax.Array, md: SamplingMetadata, prompt_mask: jax.Array,
           output_counts: jax.Array, *, num_logprobs: int,
           bitmask: jax.Array | None = None) -> SamplerOutput:
    """Sample one token per row from logits f32/bf16[S, V].

    prompt_mask bool[N, V] and output_counts i32[N, V] are the per-slot penalty state,
    read through md.row_slots only when some row has a penalty. num_logprobs (static
    K >= 1) sizes the logprob fields; they hold the log_softmax of the raw logits (before
    bias, penalties and temperature, vLLM's default) when any row wants logprobs, zeros
    otherwise. Rows that do not want logprobs get values too when a neighbour does.
    bitmask int32[S, ceil(V / 32)] (structured outputs, worker.bitmask): tokens whose bit is
    clear get -inf after the penalties; logprobs stay those of the raw logits.
    """
    _check_shapes(logits, md, prompt_mask, output_counts, num_logprobs)
    raw = logits.astype(jnp.float32)
    x = add_logit_bias(raw, md.bias_token_ids, md.bias_values.astype(jnp.float32))
    x = _penalize(x, md, prompt_mask, output_counts)
    if bitmask is not None:
        x = apply_token_bitmask(x, bitmask)
    greedy = md.temperature < GREEDY_TEMPERATURE_EPS
    greedy_ids = jnp.argmax(x, axis=-1).astype(jnp.int32)
    token_ids = lax.cond(
        jnp.all(greedy), lambda x: greedy_ids,
        lambda x: jnp.where(greedy, greedy_ids, _sample_random(x, md, greedy)), x)
    sampled, top_ids, top_lp = _logprobs(raw, token_ids, md.want_logprobs, num_logprobs)
    return SamplerOutput(token_ids=token_ids, sampled_logprobs=sampled,
                         top_logprob_ids=top_ids, top_logprobs=top_lp)
