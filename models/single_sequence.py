"""Runs ONE sequence through the paged model: full forward, chunked prefill, greedy decode.

Not the serving engine (that batches many sequences with a scheduler); this is the smallest
correct driver of the model's paged forward pass, used by model tests and by
`jaxserve generate` for a quick look at a model. Pages 1..n hold the sequence in order;
page 0 is the null page.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.models.attention_metadata import single_sequence_metadata
from jaxserve.models.decoder import CausalLM, init_kv_caches


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _step(graphdef, state, kv_caches, input_ids, positions, md, logits_indices, rope_lengths):
    model = nnx.merge(graphdef, state)
    return model(kv_caches, input_ids, positions, md, logits_indices, rope_lengths)


class SingleSequenceRunner:
    def __init__(self, model: CausalLM, *, max_len: int, page_size: int = 16):
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.page_size = page_size
        self.max_pages = -(-max_len // page_size)
        self.pages = list(range(1, self.max_pages + 1))
        self.kv_caches = init_kv_caches(self.cfg, self.max_pages + 1, page_size, model.dtype)
        self.max_len = max_len

    def run(self, token_ids, start: int, last_only: bool = False, prompt_len: int | None = None) -> np.ndarray:
        """Computes tokens [start, start + len(token_ids)) given the cached context [0, start).
        prompt_len: the sequence's prompt length, which picks longrope's factors as the engine
        does (models.rope); without it, the context length after this call does.
        Returns float32 logits [len(token_ids), V] (or [1, V] with last_only)."""
        n = len(token_ids)
        if start + n > self.max_len:
            raise ValueError(f"sequence of {start + n} tokens exceeds max_len {self.max_len}")
        md = single_sequence_metadata(self.pages, self.page_size, self.max_pages, start, n)
        md = jax.tree.map(jnp.asarray, md)
        idx = jnp.asarray([n - 1] if last_only else np.arange(n), jnp.int32)
        positions = np.arange(start, start + n, dtype=np.int32)
        lengths = None if prompt_len is None else jnp.asarray(np.maximum(prompt_len, positions + 1))
        self.kv_caches, logits = _step(
            self.graphdef, self.state, self.kv_caches, jnp.asarray(token_ids, jnp.int32),
            jnp.asarray(positions), md, idx, lengths,
        )
        return np.asarray(logits)

    def full_logits(self, token_ids) -> np.ndarray:
        """Logits of every position of `token_ids` from one forward pass."""
        return self.run(token_ids, 0)

    def greedy(self, prompt_ids, max_new_tokens: int, stop_ids=(), chunk: int | None = None) -> list[int]:
        """Greedy decoding: prefill (optionally in chunks), then one token per step."""
        prompt_ids = list(prompt_ids)
        chunk = chunk or len(prompt_ids)
        for s in range(0, len(prompt_ids), chunk):
            logits = self.run(prompt_ids[s:s + chunk], s, last_only=True, prompt_len=len(prompt_ids))
        out: list[int] = []
        pos = len(prompt_ids)
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits[-1]))
            out.append(token)
            if token in stop_ids or len(out) == max_new_tokens or pos + 1 > self.max_len:
                break
            logits = self.run([token], pos, last_only=True, prompt_len=len(prompt_ids))
            pos += 1
        return out
