"""On-device sampling: logits [S, V] -> token ids [S] (+ optional logprobs).

Runs inside the engine's single jitted step, so everything here has fixed shapes. One row
per sequence sampled this step; S is the padded row count, V the vocabulary.

Flow of `sample` (same order as vLLM):

    raw logits (f32) --log_softmax--> logprobs (returned when num_logprobs > 0)
      -> + logit bias (OpenAI logit_bias; the engine also bans EOS with -inf here)
      -> penalties (repetition over prompt+output, presence/frequency over output)
      -> greedy rows: argmax
         other rows: / temperature -> top-k -> top-p -> min-p -> categorical(row key)

A row's PRNG key is fold_in(key(seed), step), derived on device, so a seeded request gets
the same tokens whatever else is in the batch. The sort that top-k / top-p need runs under
`lax.cond` only when some sampled row uses them, and the whole random path is skipped when
every row is greedy.

The host side builds `SamplingMetadata` as numpy arrays with `SamplingMetadata.from_rows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling_params import GREEDY_TEMPERATURE_EPS, SamplingParams

SEED_MODULUS = 2**31  # host seeds are reduced mod this to fit int32


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    """Host description of one sequence to sample this step."""

    params: SamplingParams
    seed: int  # the request's seed, or a random one the engine drew for it
    step: int  # tokens generated so far by this sequence
    prompt_token_ids: Sequence[int]  # used only for the repetition penalty
    output_token_ids: Sequence[int]  # used only for penalties
    # Extra additive bias merged with params.logit_bias (summed on equal ids); the engine
    # uses it with -inf to ban EOS / stop tokens until min_tokens is reached.
    extra_bias: dict[int, float] | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Per-row sampling inputs; S = padded rows, L = penalty bucket, B = bias bucket."""

    temperature: jax.Array  # f32[S]; < GREEDY_TEMPERATURE_EPS -> greedy
    top_k: jax.Array  # i32[S]; 0 -> off
    top_p: jax.Array  # f32[S]; 1 -> off
    min_p: jax.Array  # f32[S]; 0 -> off
    repetition_penalty: jax.Array  # f32[S]; 1 -> off
    presence_penalty: jax.Array  # f32[S]; 0 -> off
    frequency_penalty: jax.Array  # f32[S]; 0 -> off
    seeds: jax.Array  # i32[S]
    steps: jax.Array  # i32[S]; row key = fold_in(key(seed), step)
    prompt_token_ids: jax.Array  # i32[S, L], -1 padded; only for repetition penalty
    output_token_ids: jax.Array  # i32[S, L], -1 padded; only for penalties
    bias_token_ids: jax.Array  # i32[S, B], -1 padded
    bias_values: jax.Array  # f32[S, B]; added to logits (may be -inf)

    @staticmethod
    def required_penalty_len(rows: Sequence[SamplingRow]) -> int:
        """Smallest L that fits every row's penalty tokens (>= 1)."""
        return max([1] + [len(t) for r in rows if r.params.needs_penalties for t in _penalty_tokens(r)])

    @staticmethod
    def required_bias_len(rows: Sequence[SamplingRow]) -> int:
        """Smallest B that fits every row's merged logit bias (>= 1)."""
        return max([1] + [len(_merged_bias(r)) for r in rows if r.params.logit_bias or r.extra_bias])

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], *, num_rows_padded: int,
                  penalty_len: int, bias_len: int) -> SamplingMetadata:
        """Build numpy metadata; rows past len(rows) are padding (greedy, no penalties).

        Token lists are filled only for rows whose params need them (prompt tokens only
        for repetition_penalty != 1), so L=1 is enough for a batch without penalties.
        Raises ValueError when rows do not fit num_rows_padded / penalty_len / bias_len.
        """
        s = num_rows_padded
        if len(rows) > s:
            raise ValueError(f"num_rows_padded must be >= {len(rows)} rows, got {s}")
        need_l, need_b = cls.required_penalty_len(rows), cls.required_bias_len(rows)
        if penalty_len < need_l:
            raise ValueError(f"penalty_len must be >= {need_l}, got {penalty_len}")
        if bias_len < need_b:
            raise ValueError(f"bias_len must be >= {need_b}, got {bias_len}")
        n = len(rows)

        def column(values, pad, dtype) -> np.ndarray:
            out = np.full((s,), pad, dtype)
            out[:n] = np.fromiter(values, dtype, n)
            return out

        params = [r.params for r in rows]
        a = dict(
            temperature=column((0.0 if p.is_greedy else p.temperature for p in params), 0.0, np.float32),
            top_k=column((p.top_k for p in params), 0, np.int32),
            top_p=column((p.top_p for p in params), 1.0, np.float32),
            min_p=column((p.min_p for p in params), 0.0, np.float32),
            repetition_penalty=column((p.repetition_penalty for p in params), 1.0, np.float32),
            presence_penalty=column((p.presence_penalty for p in params), 0.0, np.float32),
            frequency_penalty=column((p.frequency_penalty for p in params), 0.0, np.float32),
            seeds=column((r.seed % SEED_MODULUS for r in rows), 0, np.int32),
            steps=column((r.step for r in rows), 0, np.int32),
            prompt_token_ids=np.full((s, penalty_len), -1, np.int32),
            output_token_ids=np.full((s, penalty_len), -1, np.int32),
            bias_token_ids=np.full((s, bias_len), -1, np.int32),
            bias_values=np.zeros((s, bias_len), np.float32),
        )
        for i, row in enumerate(rows):  # only rows with penalties or a bias have lists to copy
            if row.params.needs_penalties or row.params.logit_bias or row.extra_bias:
                _fill_lists(a, i, row)
        return cls(**a)


def _penalty_tokens(row: SamplingRow) -> tuple[Sequence[int], Sequence[int]]:
    p = row.params
    if not p.needs_penalties:
        return (), ()
    prompt = row.prompt_token_ids if p.repetition_penalty != 1.0 else ()
    return prompt, row.output_token_ids


def _merged_bias(row: SamplingRow) -> dict[int, float]:
    bias = row.params.logit_bias_dict
    for t, v in (row.extra_bias or {}).items():
        bias[t] = bias.get(t, 0.0) + v
    return bias


def _fill_lists(a: dict[str, np.ndarray], i: int, row: SamplingRow) -> None:
    prompt, output = _penalty_tokens(row)
    a["prompt_token_ids"][i, : len(prompt)] = prompt
    a["output_token_ids"][i, : len(output)] = output
    bias = sorted(_merged_bias(row).items())
    a["bias_token_ids"][i, : len(bias)] = [t for t, _ in bias]
    a["bias_values"][i, : len(bias)] = [v for _, v in bias]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """Sampled tokens; logprob fields are None when num_logprobs == 0."""

    token_ids: jax.Array  # i32[S]
    sampled_logprobs: jax.Array | None = None  # f32[S], logprob of token_ids
    top_logprob_ids: jax.Array | None = None  # i32[S, K], descending logprob
    top_logprobs: jax.Array | None = None  # f32[S, K]


def _scatter_ids(token_ids: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    # -1 pads are sent out of range and dropped (a bare -1 would wrap to vocab - 1).
    rows = jnp.arange(token_ids.shape[0])[:, None]
    return rows, jnp.where(token_ids < 0, vocab, token_ids)


def add_logit_bias(logits: jax.Array, bias_token_ids: jax.Array,
                   bias_values: jax.Array) -> jax.Array:
    """logits f32[S, V] + bias at (row, bias_token_ids[row, j]); -1 ids ignored."""
    rows, ids = _scatter_ids(bias_token_ids, logits.shape[-1])
    return logits.at[rows, ids].add(bias_values, mode="drop")


def token_counts(token_ids: jax.Array, vocab: int) -> jax.Array:
    """i32[S, L] (-1 padded) -> i32[S, V] occurrence counts."""
    rows, ids = _scatter_ids(token_ids, vocab)
    zeros = jnp.zeros((token_ids.shape[0], vocab), jnp.int32)
    return zeros.at[rows, ids].add(1, mode="drop")


def penalize(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Repetition (vLLM: over prompt+output), then presence/frequency (output only)."""
    vocab = logits.shape[-1]
    out_counts = token_counts(md.output_token_ids, vocab)
    seen = (token_counts(md.prompt_token_ids, vocab) > 0) | (out_counts > 0)
    rep = md.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - md.frequency_penalty[:, None] * out_counts
            - md.presence_penalty[:, None] * (out_counts > 0))


def filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set tokens outside top-k, then outside top-p, to -inf. Sorts the vocabulary.

    logits f32[S, V] (temperature already applied); top_k i32[S] (0 = off);
    top_p f32[S] (1 = off). Ties at a cut-off are all kept (as vLLM's top-k), so the
    support is a function of the logit values alone: top-k keeps logits >= the k-th
    largest; top-p keeps the smallest descending prefix whose probability (after top-k)
    reaches top_p, extended to every token equal to its last logit.
    """
    vocab = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # [S, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [S, 1]
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    # Exclusive cumsum is exactly monotone, so `keep` is a prefix; position 0 always kept.
    cum = jnp.cumsum(probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
    last = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1) - 1, 0)
    p_cut = jnp.take_along_axis(desc, last[:, None], axis=-1)
    cutoff = jnp.where((top_p < 1.0)[:, None], jnp.maximum(kth, p_cut), kth)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def filter_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keep tokens with prob >= min_p * max prob, i.e. logit >= max + log(min_p)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits >= top + jnp.log(min_p)[:, None], logits, -jnp.inf)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  min_p: jax.Array) -> jax.Array:
    """top-k -> top-p -> min-p on temperature-scaled logits f32[S, V]; filtered = -inf.

    The sort is skipped (lax.cond, a real branch on CPU/GPU/TPU) when no row uses top-k or
    top-p. Callers mask out greedy rows' top_k/top_p first if those rows do not matter.
    """
    needs_sort = jnp.any((top_k > 0) | (top_p < 1.0))
    logits = jax.lax.cond(needs_sort, lambda x: filter_top_k_top_p(x, top_k, top_p),
                          lambda x: x, logits)
    return filter_min_p(logits, min_p)


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Typed PRNG keys [S]: fold_in(key(seed), step) per row."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)


def _sample_random(logits: jax.Array, md: SamplingMetadata, greedy: jax.Array) -> jax.Array:
    temperature = jnp.where(greedy, 1.0, md.temperature)
    scaled = logits / temperature[:, None]
    # Greedy rows must not force the sort, whatever their top_k / top_p say.
    top_k = jnp.where(greedy, 0, md.top_k)
    top_p = jnp.where(greedy, 1.0, md.top_p)
    scaled = filter_logits(scaled, top_k, top_p, md.min_p)
    keys = row_keys(md.seeds, md.steps)
    return jax.vmap(lambda k, x: jax.random.categorical(k, x))(keys, scaled)


def sample(logits: jax.Array, md: SamplingMetadata, *, apply_penalties: bool,
           num_logprobs: int) -> SamplerOutput:
    """Sample one token per row from logits f32/bf16[S, V].

    apply_penalties and num_logprobs are static. Logprobs (when num_logprobs > 0) are the
    log_softmax of the raw logits, before bias, penalties and temperature (vLLM default).
    """
    if logits.ndim != 2 or logits.shape[0] != md.temperature.shape[0]:
        raise ValueError(f"logits must be [S={md.temperature.shape[0]}, V], got {logits.shape}")
    raw = logits.astype(jnp.float32)
    x = add_logit_bias(raw, md.bias_token_ids, md.bias_values)
    if apply_penalties:
        x = penalize(x, md)
    greedy = md.temperature < GREEDY_TEMPERATURE_EPS
    greedy_ids = jnp.argmax(x, axis=-1).astype(jnp.int32)
    token_ids = jax.lax.cond(
        jnp.all(greedy), lambda: greedy_ids,
        lambda: jnp.where(greedy, greedy_ids, _sample_random(x, md, greedy)).astype(jnp.int32))
    if num_logprobs <= 0:
        return SamplerOutput(token_ids=token_ids)
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    sampled = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    return SamplerOutput(token_ids=token_ids, sampled_logprobs=sampled,
                         top_logprob_ids=top_ids.astype(jnp.int32), top_logprobs=top_lp)
