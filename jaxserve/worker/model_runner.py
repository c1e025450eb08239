"""ModelRunner: turns a SchedulerOutput into ONE jitted device step and returns sampled tokens.

Host: pad the step to the nearest precompiled bucket (tokens, sequences) and build numpy
inputs (token ids, positions, slot mapping, block tables, kv lengths, query offsets, logits
rows, copy-on-write pairs, sampling metadata). Device: copy-on-write page copies, the model
forward over the paged KV cache (KV write + ragged paged attention per layer), and sampling;
the KV pages are donated, so they are updated in place. Only token ids (and logprobs when a
request asked for them) come back to the host.

Every (token bucket, sequence bucket, penalties on/off) shape is compiled by `warm_up`;
`compile_count` counts compilations so a test can prove none happen afterwards.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import time

import jax
import numpy as np
from flax import nnx

from jaxserve.worker.sampler import SamplingMetadata, SamplingRow, sample
from jaxserve.core.scheduler import SchedulerOutput
from models.attention_metadata import AttentionMetadata
from models.decoder import CausalLM

log = logging.getLogger(__name__)

MAX_BIAS_ENTRIES = 64  # logit_bias entries + tokens banned by min_tokens, per request


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """T = token bucket, S = sequence bucket."""

    input_ids: jax.Array  # int32[T]
    positions: jax.Array  # int32[T]
    md: AttentionMetadata
    logits_indices: jax.Array  # int32[S]  row of the flat batch each sample row reads
    copy_src: jax.Array  # int32[S]  copy-on-write: pages[copy_dst[i]] = pages[copy_src[i]]
    copy_dst: jax.Array  # int32[S]  (padding copies null page 0 onto itself)


def pick_bucket(buckets: tuple[int, ...], n: int) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def _copy_pages(kv: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    return kv.at[dst].set(kv[src])


def _step(graphdef, state, kv_caches, inputs: StepInputs, smd: SamplingMetadata, *,
          apply_penalties: bool, num_logprobs: int):
    model = nnx.merge(graphdef, state)
    kv_caches = [_copy_pages(kv, inputs.copy_src, inputs.copy_dst) for kv in kv_caches]
    kv_caches, logits = model(kv_caches, inputs.input_ids, inputs.positions, inputs.md, inputs.logits_indices)
    return kv_caches, sample(logits, smd, apply_penalties=apply_penalties, num_logprobs=num_logprobs)


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[jax.Array], *, page_size: int, max_model_len: int,
                 token_buckets: tuple[int, ...], seq_buckets: tuple[int, ...], block_table_fn, max_logprobs: int,
                 placement=None):
        self.graphdef, self.state = nnx.split(model)
        self.kv_caches = kv_caches
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.token_buckets = token_buckets
        self.seq_buckets = seq_buckets
        self.block_table_fn = block_table_fn  # request_id -> list of page ids
        # Top logprobs computed every step (a static shape). At least 1, so that a request
        # with logprobs=0 still gets its sampled token's logprob.
        self.num_logprobs = max(1, max_logprobs)
        # A per-runner jit: its cache size is this engine's compile count. Parameters and KV
        # pages are committed to their shardings; the KV pages keep theirs (donated, in
        # place) and what comes back to the host is replicated.
        out_shardings = None
        if placement is not None:
            out_shardings = ([placement.kv_sharding] * len(kv_caches), placement.replicated)
        self._step = jax.jit(functools.partial(_step, self.graphdef), out_shardings=out_shardings,
                             static_argnames=("apply_penalties", "num_logprobs"), donate_argnums=(1,))

    @property
    def compile_count(self) -> int:
        return self._step._cache_size()

    def shapes(self) -> list[tuple[int, int]]:
        """Every (tokens, sequences) bucket pair a step can have (no more sequences than tokens)."""
        return [(t, s) for t in self.token_buckets for s in self.seq_buckets if s <= t]

    def warm_up(self) -> None:
        start = time.perf_counter()
        pairs = self.shapes()
        log.info("warm-up: compiling %d step shapes x 2 (penalties off/on): token buckets %s, seq buckets %s",
                 len(pairs), list(self.token_buckets), list(self.seq_buckets))
        if jax.default_backend() == "cpu" and len(pairs) > 8:
            log.warning("%d programs to compile on CPU will take minutes; configs/cpu.yaml has a small bucket "
                        "set (LLM(model, config='configs/cpu.yaml'), jaxserve serve --config configs/cpu.yaml)",
                        2 * len(pairs))
        for t, s in pairs:
            for penalties in (False, True):
                inputs = self._empty_inputs(t, s)
                smd = self._sampling_md([], s, penalties)
                self.kv_caches, out = self._step(self.state, self.kv_caches, inputs, smd,
                                                 apply_penalties=penalties, num_logprobs=self.num_logprobs)
        jax.block_until_ready(out.token_ids)
        log.info("warm-up done: %d compilations in %.1f s", self.compile_count, time.perf_counter() - start)

    def _empty_inputs(self, t: int, s: int) -> StepInputs:
        md = AttentionMetadata(
            slot_mapping=np.zeros(t, np.int32), block_tables=np.zeros((s, self.max_pages_per_seq), np.int32),
            kv_lens=np.zeros(s, np.int32), cu_q_lens=np.zeros(s + 1, np.int32), num_seqs=np.zeros(1, np.int32))
        return StepInputs(np.zeros(t, np.int32), np.zeros(t, np.int32), md, np.zeros(s, np.int32),
                          np.zeros(s, np.int32), np.zeros(s, np.int32))

    def _sampling_md(self, rows: list[SamplingRow], s: int, penalties: bool) -> SamplingMetadata:
        return SamplingMetadata.from_rows(rows, num_rows_padded=s, penalty_len=self.max_model_len if penalties else 1,
                                          bias_len=MAX_BIAS_ENTRIES)

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Host-side padded inputs for one step (vectorised over sequences)."""
        t = pick_bucket(self.token_buckets, out.num_tokens)
        s = pick_bucket(self.seq_buckets, max(len(out.seqs), out.num_sample_rows))
        inputs = self._empty_inputs(t, s)
        md, n_seqs, total = inputs.md, len(out.seqs), out.num_tokens
        starts = np.fromiter((q.start for q in out.seqs), np.int32, n_seqs)
        lens = np.fromiter((q.num_new_tokens for q in out.seqs), np.int32, n_seqs)
        cu = np.cumsum(lens, dtype=np.int32)
        md.cu_q_lens[1:n_seqs + 1] = cu
        md.cu_q_lens[n_seqs + 1:] = total
        md.num_seqs[0] = n_seqs
        md.kv_lens[:n_seqs] = starts + lens
        ids: list[int] = []
        for i, q in enumerate(out.seqs):
            ids += q.request.token_ids[q.start:q.start + q.num_new_tokens]
            pages = self.block_table_fn(q.request.request_id)
            md.block_tables[i, :len(pages)] = pages
        inputs.input_ids[:total] = ids
        seq_of_token = np.repeat(np.arange(n_seqs), lens)  # [total]
        pos = np.arange(total, dtype=np.int32) - np.repeat(cu - lens - starts, lens)
        inputs.positions[:total] = pos
        md.slot_mapping[:total] = (md.block_tables[seq_of_token, pos // self.page_size] * self.page_size
                                   + pos % self.page_size)
        samples = np.fromiter((q.num_samples for q in out.seqs), np.int32, n_seqs)
        rows = np.repeat(cu - 1, samples)
        inputs.logits_indices[:len(rows)] = rows
        for i, (src, dst) in enumerate(out.copies):
            inputs.copy_src[i], inputs.copy_dst[i] = src, dst
        return inputs

    def dispatch(self, out: SchedulerOutput, rows: list[SamplingRow]):
        """Starts one step on the device and returns at once (JAX dispatch is asynchronous);
        `collect` waits for its tokens. The host can do other work in between."""
        if len(out.copies) > len(out.seqs):
            raise AssertionError(f"{len(out.copies)} copy-on-write pages for {len(out.seqs)} sequences")
        inputs = self.prepare(out)
        s = inputs.logits_indices.shape[0]
        penalties = any(r.params.needs_penalties for r in rows)
        smd = self._sampling_md(rows, s, penalties)
        self.kv_caches, result = self._step(self.state, self.kv_caches, inputs, smd,
                                            apply_penalties=penalties, num_logprobs=self.num_logprobs)
        return result, len(rows)

    @staticmethod
    def collect(handle, want_logprobs: bool) -> tuple[np.ndarray, tuple | None]:
        """(token ids int32[num rows], logprobs or None) of a dispatched step, where logprobs
        is (sampled f32[R], top ids i32[R, K], top logprobs f32[R, K])."""
        result, n = handle
        tokens = np.asarray(result.token_ids)[:n]
        if not want_logprobs:
            return tokens, None
        return tokens, (np.asarray(result.sampled_logprobs)[:n], np.asarray(result.top_logprob_ids)[:n],
                        np.asarray(result.top_logprobs)[:n])
