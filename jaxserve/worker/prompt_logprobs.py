"""Prompt logprobs (SamplingParams.prompt_logprobs): the logprob of every prompt token given
the tokens before it, and the top K at its position, computed in the prefill steps that run
anyway.

The model runner's one body program returns the final-normed hidden states of all its T flat
rows beside the sample rows (the decoder computes them anyway). A step that holds a prefill
chunk of such a request then runs one more, small program, `prompt_logprobs_program(T)`:
the LM head over every one of the T rows (not only the sample rows), in blocks of
PROMPT_LOGPROB_BLOCK rows so the [rows, V] logits stay small, followed by log_softmax, top-K
(K = the engine's max_logprobs, static) and the logprob and rank of each row's *target*: the
prompt token that follows the row's position, which the host knows (it sends them, -1 where
no target is wanted). Only [T, K] + [T] + [T] values come back to the host. It is compiled
for every token bucket at warm-up (no decoder layers in it: cheap to compile); steps without
such a request do not run it.

Chunked prefill needs nothing special: the target of a chunk's last row is the first prompt
token of the next chunk, known to the host. Prefix-cache hits would skip positions, so a
request that wants prompt logprobs is admitted without them (Scheduler, as vLLM).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.core.scheduler import SchedulerOutput

PROMPT_LOGPROB_BLOCK = 256  # LM-head rows per block: logits are [block, V] at a time

__all__ = ["PromptLogprobsOutput", "prompt_logprob_targets", "prompt_logprobs", "prompt_logprobs_program",
           "wants_prompt_logprobs"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptLogprobsOutput:
    """Per flat row of a step (T rows); rows whose target is -1 hold values of no meaning."""

    target_logprobs: jax.Array  # f32[T]   log p(target | tokens up to the row)
    target_ranks: jax.Array  # i32[T]   1-based rank of the target in the row's distribution
    top_ids: jax.Array  # i32[T, K]  descending logprob
    top_logprobs: jax.Array  # f32[T, K]

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        return self.target_logprobs, self.target_ranks, self.top_ids, self.top_logprobs


def prompt_logprobs(model, hidden: jax.Array, targets: jax.Array, k: int) -> PromptLogprobsOutput:
    """hidden [T, D] (final-normed) and targets i32[T] (-1: none) -> PromptLogprobsOutput.
    The logits are the model's (compute_logits: float32, scaled and soft-capped)."""

    def rows(args):
        h, t = args  # [D], []
        logprobs = jax.nn.log_softmax(model.compute_logits(h[None])[0], axis=-1)  # [V]
        target = logprobs[jnp.maximum(t, 0)]
        rank = 1 + jnp.sum(logprobs > target).astype(jnp.int32)
        top_lp, top_ids = jax.lax.top_k(logprobs, k)
        return target, rank, top_ids.astype(jnp.int32), top_lp

    block = min(hidden.shape[0], PROMPT_LOGPROB_BLOCK)
    target, rank, top_ids, top_lp = jax.lax.map(rows, (hidden, targets), batch_size=block)
    return PromptLogprobsOutput(target, rank, top_ids, top_lp)


def prompt_logprobs_program(graphdef, params, hidden: jax.Array, targets: jax.Array, *,
                            num_logprobs: int) -> PromptLogprobsOutput:
    """The model runner's prompt-logprob program: hidden [T, D], the final-normed hidden states
    of every flat row that the step's body returns beside the sample rows; targets i32[T]."""
    return prompt_logprobs(nnx.merge(graphdef, params), hidden, targets, num_logprobs)


def wants_prompt_logprobs(out: SchedulerOutput) -> bool:
    """True when a sequence of the step computes prompt positions whose logprobs are wanted."""
    return any(s.request.params.prompt_logprobs is not None and s.start < s.request.num_prompt_tokens - 1
               for s in out.seqs)


def prompt_logprob_targets(out: SchedulerOutput, num_rows: int) -> np.ndarray:
    """i32[num_rows]: at the flat row of prompt position p of a request that wants prompt
    logprobs, prompt token p + 1 (for p < num_prompt - 1); -1 elsewhere and in padding."""
    targets = np.full(num_rows, -1, np.int32)
    row = 0
    for s in out.seqs:
        req = s.request
        if req.params.prompt_logprobs is not None:
            end = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
            if end > s.start:
                targets[row:row + end - s.start] = req.token_ids[s.start + 1:end + 1]
        row += s.num_new_tokens
    return targets
