"""Draft-model speculation on the device (speculative_config.method "draft_model").

The draft is a small model with the target's vocabulary and its own paged KV cache of the same
page count and page size: both caches are indexed by the target's block tables, so the draft's
pages are allocated, shared (prefix cache, copy-on-write) and freed with the target's.

One step, in dispatch order (ModelRunner.dispatch hands the step to `DraftRunner.dispatch`):

    state updates        the runner's resets / assignment / cells (all chunks: the draft reads the
                         block tables before the body), copy-on-write copies in both caches
    propose(R)           per sample row with k > 0 proposals: k greedy draft decode steps from
                         the row's token at seq_lens (positions p .. p + k - 1), one lax.fori_loop;
                         -> drafts [R, K] and the same per slot [N, K]
    draft_body(T)        the draft over the step's flat tokens (prefill chunks too), so its KV
                         follows every token the target computes; the host's placeholders -2 - j
                         (InputBatch writes ScheduledSeq.draft_token_ids) become proposal j of the
                         token's slot -> the filled token ids
    body(T)              the target's body on the filled ids
    verify(R)            worker.spec_decode, with the device drafts

A greedy draft is a deterministic proposal (its distribution is one-hot), so verify's rejection
rule is exact for sampled rows too. A draft identical to the target accepts every greedy proposal.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxserve.models.attention_metadata import AttentionMetadata
from jaxserve.models.decoder import copy_pages, kv_cache_sharding
from jaxserve.worker.input_batch import BodyInputs, rope_lengths, step_positions
from jaxserve.worker.model_runner import _no_cells
from jaxserve.worker.spec_decode import VerifyInputs

__all__ = ["DraftRunner"]


def propose(graphdef, params, kv_caches, state, slots: jax.Array, first: jax.Array, num_draft: jax.Array, *,
            k: int, page_size: int):
    """slots i32[R] (padding: PAD_SLOT), first i32[R] the token at each row's seq_lens position,
    num_draft i32[R] -> (kv_caches, drafts i32[R, K] (-1 past num_draft), by_slot i32[N, K])."""
    model = nnx.merge(graphdef, params)
    r = slots.shape[0]
    m = state.block_tables.shape[1]
    tables = state.block_tables[slots]  # [R, M]
    start = state.seq_lens[slots]  # [R]
    cu = jnp.arange(r + 1, dtype=jnp.int32)
    rows = jnp.arange(r)

    def one(j, carry):
        kv, tok, drafts = carry
        pos = start + j  # [R]
        live = j < num_draft
        page = tables[rows, jnp.minimum(pos // page_size, m - 1)]
        md = AttentionMetadata(slot_mapping=jnp.where(live, page * page_size + pos % page_size, 0),
                               block_tables=tables, kv_lens=pos + 1, cu_q_lens=cu,
                               num_seqs=jnp.full((1,), r, jnp.int32))
        kv, h = model.forward(kv, tok, pos, md, None, jnp.maximum(state.num_prompt[slots], pos + 1))  # [R, D]
        nxt = jnp.argmax(model.compute_logits(h), axis=-1).astype(jnp.int32)
        return kv, nxt, drafts.at[:, j].set(jnp.where(live, nxt, -1))

    kv_caches, _, drafts = lax.fori_loop(0, k, one, (kv_caches, first, jnp.full((r, k), -1, jnp.int32)))
    by_slot = jnp.full((state.seq_lens.shape[0], k), -1, jnp.int32).at[slots].set(drafts, mode="drop")
    return kv_caches, drafts, by_slot


def draft_body(graphdef, params, kv_caches, state, inp: BodyInputs, by_slot: jax.Array, *, page_size: int):
    """The draft over the step's flat tokens; placeholders -2 - j take proposal j of their slot.
    Returns (kv_caches, the filled host ids i32[T])."""
    model = nnx.merge(graphdef, params)
    t, s = inp.host_ids.shape[0], inp.seq_slots.shape[0]
    tok = jnp.arange(t, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(inp.cu_q_lens, tok, side="right") - 1, 0, s - 1)  # [T]
    j = jnp.clip(-2 - inp.host_ids, 0, by_slot.shape[1] - 1)
    ids = jnp.where(inp.host_ids <= -2, by_slot[inp.seq_slots[seq], j], inp.host_ids)
    inp = dataclasses.replace(inp, host_ids=ids)
    input_ids, positions, slot_mapping, kv_lens, tables = step_positions(state, inp, page_size)
    md = AttentionMetadata(slot_mapping=slot_mapping, block_tables=tables, kv_lens=kv_lens,
                           cu_q_lens=inp.cu_q_lens, num_seqs=inp.num_seqs)
    kv_caches, _ = model.forward(kv_caches, input_ids, positions, md, jnp.zeros((1,), jnp.int32),
                                 rope_lengths(state, inp, positions))
    return kv_caches, ids


class DraftRunner:
    """The draft's weights, KV cache and programs; drives a speculating ModelRunner's steps."""

    def __init__(self, model, kv_caches, *, num_speculative_tokens: int, page_size: int, placement=None):
        """placement: the draft's jaxserve.sharding.Placement (on the target's mesh); its KV cache
        keeps its sharding through every program, as the target's does."""
        self.graphdef, self.params = nnx.split(model)
        self.kv_caches = kv_caches
        self.k = num_speculative_tokens
        g = self.graphdef
        kv, rep = None, None
        if placement is not None:
            kv, rep = kv_cache_sharding(placement.kv_sharding, kv_caches), placement.replicated
        out = (lambda *s: dict(out_shardings=s)) if placement is not None else (lambda *s: {})  # noqa: E731
        self._propose = jax.jit(functools.partial(propose, g, k=self.k, page_size=page_size), donate_argnums=(1,),
                                **out(kv, rep, rep))
        self._body = jax.jit(functools.partial(draft_body, g, page_size=page_size), donate_argnums=(1,),
                             **out(kv, rep))
        self._copy = jax.jit(functools.partial(copy_pages), donate_argnums=(0,),
                             **(dict(out_shardings=kv) if kv is not None else {}))
        self.programs = (self._propose, self._body, self._copy)

    def shapes_to_compile(self, runner) -> list[tuple[str, int]]:
        return ([("draft_propose", r) for r in runner.shapes.row_buckets]
                + [("draft_body", t) for t in runner.shapes.token_buckets]
                + [("draft_copy", runner.shapes.max_num_seqs)])

    def warm_up(self, runner) -> None:
        """Compiles the draft's programs, and the target's body and verify programs on the device
        arrays the draft hands them (a jit's cache keys on where its inputs live, so the runner's
        own warm-up leaves those two to this one): each program once per bucket."""
        n = runner.batch.num_slots
        shapes = runner.shapes
        zeros = np.zeros(shapes.max_num_seqs, np.int32)
        self.kv_caches = self._copy(self.kv_caches, zeros, zeros)  # the null page onto itself
        drafts = {}
        for r in shapes.row_buckets:
            pad = np.full(r, n - 1, np.int32)
            self.kv_caches, drafts[r], by_slot = self._propose(self.params, self.kv_caches, runner.state, pad,
                                                               np.zeros(r, np.int32), np.zeros(r, np.int32))
        for t in shapes.token_buckets:
            s = shapes.seqs(t)
            inp = BodyInputs(np.zeros(t, np.int32), np.zeros(s + 1, np.int32), np.full(s, n - 1, np.int32),
                             np.zeros(1, np.int32), np.zeros(shapes.max_num_seqs * runner.batch.group_size, np.int32))
            self.kv_caches, ids = self._body(self.params, self.kv_caches, runner.state, inp, by_slot)
            runner.kv_caches, runner.state, hidden, _ = runner._body(runner.params, runner.kv_caches, runner.state,
                                                                  dataclasses.replace(inp, host_ids=ids), _no_cells())
        for r in shapes.row_buckets:
            pad = np.full(r, n - 1, np.int32)
            inp = VerifyInputs(pad, np.zeros(r, np.int32), np.zeros(r, np.bool_), drafts[r], np.zeros(r, np.int32),
                               runner._allow_all[r])
            runner.state, out = runner.spec.jit(runner.params, runner.state, hidden, inp)
        jax.block_until_ready((self.kv_caches, runner.state, out.token_ids))

    def dispatch(self, runner, plan, out, bitmask):
        """ModelRunner.dispatch's sequence with the draft's programs in it (module docstring)."""
        copies = runner.update_before_body(plan, out, plan.cells)  # every cell: the body below takes none
        if copies is not None:  # the draft's cache shares the target's block tables: the same copies
            self.kv_caches = self._copy(self.kv_caches, *copies)
        sample = plan.sample
        r = sample.row_slots.shape[0]
        first = np.zeros(r, np.int32)
        num = np.zeros(r, np.int32)
        i = 0
        for s in out.seqs:
            for _ in range(s.num_samples):
                if s.draft_token_ids:
                    first[i], num[i] = s.request.token_ids[s.start], len(s.draft_token_ids)
                i += 1
        self.kv_caches, drafts, by_slot = self._propose(self.params, self.kv_caches, runner.state, sample.row_slots,
                                                        first, num)
        self.kv_caches, ids = self._body(self.params, self.kv_caches, runner.state, plan.body, by_slot)
        runner.kv_caches, runner.state, hidden, _ = runner._body(runner.params, runner.kv_caches, runner.state,
                                                              dataclasses.replace(plan.body, host_ids=ids), _no_cells())
        mask = runner._allow_all[r]
        if bitmask is not None:
            mask = jax.device_put(bitmask(r), runner._mask_placement)
        inp = VerifyInputs(sample.row_slots, sample.row_sample_index, sample.row_owner, drafts, num, mask)
        runner.state, handle = runner.spec.dispatch(runner.params, runner.state, hidden, inp, plan.num_rows,
                                                    plan.want_logprobs)
        return handle
