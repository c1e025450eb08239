"""ModelRunner: runs one SchedulerOutput as a few precompiled device programs and hands back
its sampled tokens asynchronously.

Programs of one step, in dispatch order (each jitted once per bucket, state donated):

    reset_penalty_rows  (rare)  clear penalty rows of new slots of penalised requests
    apply_assignment    (new slots)   sampling params, bias, seq_lens of new slots
    apply_cells         (> CELL_BUCKET changes)  extra chunks of sparse state writes
    copy_pages          (COW steps)   copy-on-write page copies, only in steps that have them
    body(T)             first the step's sparse state writes (block-table cells, prompt mask
                        and output count cells: one fixed-size chunk, no extra dispatch),
                        then the decoder over T flat tokens: positions, input ids (placeholders
                        read from the slot's last token), slot mapping and block tables are
                        derived on the device from the slot state; KV pages donated
                        (the body returns the final-normed hidden states of the sample rows
                        and of all T rows)
    prompt_logprobs(T)  (steps with a prompt-logprob request's prefill chunk) the LM head over
                        the body's T rows, each row's target-token logprob, rank and top K
                        (worker/prompt_logprobs.py); no decoder layers, cheap to compile
    sample(R)           LM head on the R sample rows, sampling, and the slot updates
                        (last token, output count, penalty counts) that the next step reads;
                        its token bitmask input (structured outputs) is a device-resident
                        all-ones mask in plain steps, so both kinds run one program

`dispatch` returns as soon as the programs are queued (JAX dispatch is asynchronous) and
starts the device-to-host copy of the tokens; `collect` waits for them. The engine
schedules and dispatches step N+1 between the two, so the device runs N+1 right after N.

Compile set: one body (and one prompt-logprob program, unless enable_prompt_logprobs is off)
per token bucket, one sampler per row bucket, plus the small state programs (`shapes()` lists
them); `warm_up` compiles them all, `compile_count` proves that nothing compiles afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import numpy as np
from flax import nnx

from jaxserve.core.scheduler import SchedulerOutput
from jaxserve.core.step_shapes import StepShapes
from jaxserve.worker.input_batch import (CELL_BUCKET, MAX_BIAS_ENTRIES, RESET_ROWS, BodyInputs, Cells, InputBatch,
                                         SampleInputs, SlotAssignment, SLOT_COLUMNS, SlotState, apply_assignment,
                                         apply_cells, init_slot_state, reset_penalty_rows, rope_lengths,
                                         step_positions)
from jaxserve.worker.bitmask import allow_all
from jaxserve.worker.lora_slots import LoRAWriter, token_lora_slots
from jaxserve.worker.prompt_logprobs import prompt_logprob_targets, prompt_logprobs_program, wants_prompt_logprobs
from jaxserve.worker.sampler import SamplingMetadata, sample
from jaxserve.worker.spec_decode import SpecVerifier
from jaxserve.models.attention_metadata import AttentionMetadata
from jaxserve.models.decoder import CausalLM, copy_pages, kv_cache_sharding

log = logging.getLogger(__name__)

__all__ = ["ModelRunner", "StepHandle"]


def _body(graphdef, params, kv_caches, state: SlotState, inp: BodyInputs, cells: Cells, *, page_size: int,
          lora: bool = False):
    model = nnx.merge(graphdef, params)
    state = apply_cells(state, cells)
    input_ids, positions, slot_mapping, kv_lens, tables = step_positions(state, inp, page_size)
    lora_slots = token_lora_slots(state.lora_slot, inp.seq_slots, inp.cu_q_lens, input_ids.shape[0]) if lora else None
    md = AttentionMetadata(slot_mapping=slot_mapping, block_tables=tables, kv_lens=kv_lens,
                           cu_q_lens=inp.cu_q_lens, num_seqs=inp.num_seqs, lora_slots=lora_slots)
    kv_caches, hidden_all = model.forward(kv_caches, input_ids, positions, md, None,
                                          rope_lengths(state, inp, positions))  # [T, D], final-normed
    state = dataclasses.replace(state, seq_lens=state.seq_lens.at[inp.seq_slots].set(kv_lens))
    # the sample rows [max_num_seqs, D]; every row for the prompt-logprob program (worker/prompt_logprobs.py)
    return kv_caches, state, jax.numpy.take(hidden_all, inp.logits_rows, axis=0), hidden_all


def _sample(graphdef, params, state: SlotState, hidden: jax.Array, inp: SampleInputs, *, num_logprobs: int):
    model = nnx.merge(graphdef, params)
    r = inp.row_slots.shape[0]
    logits = model.compute_logits(hidden[:r])  # [R, V]
    sl = inp.row_slots
    steps = state.num_output[sl]
    banning = (steps < state.min_tokens[sl])[:, None]
    bias = jax.numpy.where(state.bias_is_ban[sl], jax.numpy.where(banning, -jax.numpy.inf, 0.0), state.bias_values[sl])
    md = SamplingMetadata(
        temperature=state.temperature[sl], top_k=state.top_k[sl], top_p=state.top_p[sl], min_p=state.min_p[sl],
        repetition_penalty=state.repetition_penalty[sl], presence_penalty=state.presence_penalty[sl],
        frequency_penalty=state.frequency_penalty[sl], seeds=state.seeds[sl], sample_index=inp.row_sample_index,
        steps=steps, bias_token_ids=state.bias_token_ids[sl], bias_values=bias, row_slots=sl,
        want_logprobs=state.want_logprobs[sl])
    out = sample(logits, md, state.prompt_mask, state.output_counts, num_logprobs=num_logprobs,
                 bitmask=inp.bitmask)
    own = jax.numpy.where(inp.row_owner, sl, state.seq_lens.shape[0])  # rows without a slot: dropped
    state = dataclasses.replace(
        state, last_tokens=state.last_tokens.at[own].set(out.token_ids, mode="drop"),
        num_output=state.num_output.at[own].add(1, mode="drop"),
        output_counts=state.output_counts.at[own, out.token_ids].add(1, mode="drop"))
    return state, out


def _no_cells() -> Cells:
    """A chunk of padding cells (every index out of range: nothing is written)."""
    oob = np.full(CELL_BUCKET, np.iinfo(np.int32).max, np.int32)
    return Cells(oob, np.zeros(CELL_BUCKET, np.int32), oob, oob)


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: its device outputs and how many rows are real."""

    result: object  # SamplerOutput (device arrays)
    num_rows: int
    want_logprobs: bool
    prompt_logprobs: object = None  # PromptLogprobsOutput (device arrays) of a prompt-logprob step


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches, *, page_size: int, max_model_len: int, shapes: StepShapes,
                 block_table_fn, max_logprobs: int, placement=None, num_speculative_tokens: int = 0, draft=None,
                 prompt_logprobs: bool = True):
        """num_speculative_tokens K > 0: every step samples through worker.spec_decode's verify
        program (K + 1 logits rows per sample row) instead of sample(R); draft: a
        worker.spec_draft.DraftRunner that proposes on the device (method draft_model);
        prompt_logprobs: compile the prompt-logprob program (worker/prompt_logprobs.py)."""
        self.graphdef, self.params = nnx.split(model)
        self.lora = LoRAWriter.for_params(self.params)  # None unless the model has LoRA slots
        self.kv_caches = kv_caches
        self.page_size = page_size
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.shapes = shapes
        vocab = model.cfg.vocab_size
        self.batch = InputBatch(shapes, max_pages_per_seq=self.max_pages_per_seq, vocab_size=vocab,
                                page_size=page_size, block_table_fn=block_table_fn)
        # Top logprobs have a static K; at least 1, so logprobs=0 still gets the sampled token's.
        self.num_logprobs = max(1, max_logprobs)
        state = init_slot_state(self.batch.num_slots, self.max_pages_per_seq, vocab)
        kv_out = rep = None
        if placement is not None:
            kv_out, rep = kv_cache_sharding(placement.kv_sharding, kv_caches), placement.replicated
            state = jax.device_put(state, rep)
        else:
            state = jax.device_put(state)
        self.state = state
        # The all-ones token bitmask of each row bucket, on the device once: plain steps send
        # none; a constrained step's host mask goes to the same sharding (same program).
        self.mask_words = -(-vocab // 32)
        self._mask_placement = rep  # both kinds are put the same way: one jit cache entry
        self._allow_all = {r: jax.device_put(allow_all(r, self.mask_words), rep) for r in shapes.row_buckets}
        # Per-runner jits: the sum of their cache sizes is this engine's compile count. The
        # KV pages and the slot state are donated (updated in place) and keep their shardings.
        g = self.graphdef
        self._body = jax.jit(functools.partial(_body, g, page_size=page_size, lora=self.lora is not None),
                             donate_argnums=(1, 2),
                             out_shardings=None if rep is None else (kv_out, rep, rep, rep))
        self._sample = jax.jit(functools.partial(_sample, g, num_logprobs=self.num_logprobs), donate_argnums=(1,),
                               out_shardings=None if rep is None else (rep, rep))
        # (jit caches are per function object: a fresh partial keeps each runner's count its own)
        state_out = dict(out_shardings=rep) if rep is not None else {}
        self._assign = jax.jit(functools.partial(apply_assignment), donate_argnums=(0,), **state_out)
        self._cells = jax.jit(functools.partial(apply_cells), donate_argnums=(0,), **state_out)
        self._reset = jax.jit(functools.partial(reset_penalty_rows), donate_argnums=(0,), **state_out)
        self._copy = jax.jit(functools.partial(copy_pages), donate_argnums=(0,),
                             **(dict(out_shardings=kv_out) if kv_out else {}))
        # The prompt-logprob program over the body's T rows (worker/prompt_logprobs.py), one per token bucket.
        self.prompt_logprobs = prompt_logprobs
        self._plp = jax.jit(functools.partial(prompt_logprobs_program, g, num_logprobs=self.num_logprobs),
                            out_shardings=None if rep is None else rep)
        self._programs = (self._body, self._sample, self._assign, self._cells, self._reset, self._copy,
                          self._plp)
        self._programs += (self.lora.program,) if self.lora is not None else ()
        self.spec = None
        if num_speculative_tokens:
            self.batch.group_size = num_speculative_tokens + 1
            self.spec = SpecVerifier(g, num_speculative_tokens=num_speculative_tokens, num_logprobs=self.num_logprobs,
                                     out_shardings=None if rep is None else (rep, rep))
            self._programs += (self.spec.jit,)
        self.draft = draft
        if draft is not None:
            self._programs += draft.programs

    @property
    def compile_count(self) -> int:
        return sum(f._cache_size() for f in self._programs)

    def shapes_to_compile(self) -> list[tuple[str, int]]:
        """Every program warm-up compiles; nothing else is ever compiled."""
        programs = self.shapes.programs()
        if self.spec is not None:  # verify(R) replaces sample(R)
            programs = [("verify" if name == "sample" else name, k) for name, k in programs]
        return (programs + [("assign", k) for k in self.batch.assignment_buckets]
                + [("prompt_logprobs", t) for t in self.shapes.token_buckets if self.prompt_logprobs]
                + [("cells", CELL_BUCKET), ("reset", RESET_ROWS), ("copy", self.shapes.max_num_seqs)]
                + ([("lora_write", 1)] if self.lora is not None else [])
                + (self.draft.shapes_to_compile(self) if self.draft is not None else []))

    def warm_up(self) -> None:
        start = time.perf_counter()
        programs = self.shapes_to_compile()
        log.info("warm-up: compiling %d programs: body per token bucket %s, sampler per row bucket %s, "
                 "state updates %s", len(programs), list(self.shapes.token_buckets), list(self.shapes.row_buckets),
                 [f"{n}({k})" for n, k in programs if n not in ("body", "sample")])
        n, oob = self.batch.num_slots, self.batch.num_slots
        hidden_all = {}  # token bucket -> a body's [T, D] rows, the prompt-logprob program's input
        for name, k in programs:
            if name.startswith("draft_") or (self.draft is not None and name in ("body", "verify")):
                continue  # the draft's warm-up, below, compiles these on its device inputs
            if name == "body":
                s = self.shapes.seqs(k)
                inp = BodyInputs(np.zeros(k, np.int32), np.zeros(s + 1, np.int32), np.full(s, n - 1, np.int32),
                                 np.zeros(1, np.int32),
                                 np.zeros(self.shapes.max_num_seqs * self.batch.group_size, np.int32))
                self.kv_caches, self.state, hidden, hidden_all[k] = self._body(self.params, self.kv_caches,
                                                                               self.state, inp, _no_cells())
            elif name == "prompt_logprobs":
                self._plp(self.params, hidden_all.pop(k), np.full(k, -1, np.int32))
            elif name == "sample":
                inp = SampleInputs(np.full(k, n - 1, np.int32), np.zeros(k, np.int32), np.zeros(k, np.bool_),
                                   self._allow_all[k])
                self.state, out = self._sample(self.params, self.state, hidden, inp)
            elif name == "verify":
                inp = self.spec.inputs(np.full(k, n - 1, np.int32), np.zeros(k, np.int32), np.zeros(k, np.bool_),
                                       self._allow_all[k], [])
                self.state, out = self.spec.jit(self.params, self.state, hidden, inp)
            elif name == "assign":
                cols = {c: np.full(k, pad, dt) for c, (dt, pad) in SLOT_COLUMNS.items()}
                a = SlotAssignment(np.full(k, oob, np.int32), cols, np.full((k, MAX_BIAS_ENTRIES), -1, np.int32),
                                   np.zeros((k, MAX_BIAS_ENTRIES), np.float32),
                                   np.zeros((k, MAX_BIAS_ENTRIES), np.bool_))
                self.state = self._assign(self.state, a)
            elif name == "cells":
                self.state = self._cells(self.state, _no_cells())
            elif name == "reset":
                self.state = self._reset(self.state, np.full(k, oob, np.int32))
            elif name == "lora_write":
                self.lora.warm_up()
            else:
                zeros = np.zeros(k, np.int32)  # copies the null page onto itself
                self.kv_caches = self._copy(self.kv_caches, zeros, zeros)
        if self.draft is not None:
            self.draft.warm_up(self)
        else:
            jax.block_until_ready((self.state, out.token_ids))
        log.info("warm-up done: %d compilations in %.1f s", self.compile_count, time.perf_counter() - start)

    def update_before_body(self, plan, out, cells) -> tuple[np.ndarray, np.ndarray] | None:
        """A step's device updates before its body: row resets, the slot assignment, the given
        cell writes and the copy-on-write page copies. Returns the copies' (src, dst) page ids
        (int32[max_num_seqs] each, padded with page 0) for a second cache (a draft's), or None."""
        for rows in plan.resets:
            self.state = self._reset(self.state, rows)
        if plan.assignment is not None:
            self.state = self._assign(self.state, plan.assignment)
        for c in cells:
            self.state = self._cells(self.state, c)
        if not out.copies:
            return None
        src = np.zeros(self.shapes.max_num_seqs, np.int32)
        dst = np.zeros(self.shapes.max_num_seqs, np.int32)
        src[:len(out.copies)], dst[:len(out.copies)] = zip(*out.copies)
        self.kv_caches = self._copy(self.kv_caches, src, dst)
        return src, dst

    def dispatch(self, out: SchedulerOutput, bitmask=None) -> StepHandle:
        """Queues one step on the device and returns at once; `collect` waits for its tokens.
        The host can schedule and dispatch the next step in between.

        bitmask: None, or a callable (padded row count R) -> int32[R, mask_words], called
        after the body is queued, so the host computes the mask while the body runs."""
        plan = self.batch.prepare(out)
        if self.draft is not None:  # the draft proposes on the device first (worker.spec_draft)
            return self.draft.dispatch(self, plan, out, bitmask)
        self.update_before_body(plan, out, plan.cells[:-1])  # the last cell write goes into the body
        self.kv_caches, self.state, hidden, hidden_all = self._body(self.params, self.kv_caches, self.state,
                                                                    plan.body, plan.cells[-1])
        plp = None
        if wants_prompt_logprobs(out):
            plp = self._plp(self.params, hidden_all, prompt_logprob_targets(out, plan.body.host_ids.shape[0]))
            for a in plp.arrays():
                a.copy_to_host_async()
        del hidden_all  # freed once the programs that read it end (in plain steps: the body)
        r = plan.sample.row_slots.shape[0]
        mask = self._allow_all[r]
        if bitmask is not None:
            mask = jax.device_put(bitmask(r), self._mask_placement)
        if self.spec is not None:
            drafts = [s.draft_token_ids for s in out.seqs for _ in range(s.num_samples)]
            inp = self.spec.inputs(plan.sample.row_slots, plan.sample.row_sample_index, plan.sample.row_owner, mask,
                                   drafts)
            self.state, handle = self.spec.dispatch(self.params, self.state, hidden, inp, plan.num_rows,
                                                    plan.want_logprobs)
            return handle
        self.state, result = self._sample(self.params, self.state, hidden,
                                          dataclasses.replace(plan.sample, bitmask=mask))
        result.token_ids.copy_to_host_async()
        if plan.want_logprobs:
            for a in (result.sampled_logprobs, result.top_logprob_ids, result.top_logprobs):
                a.copy_to_host_async()
        return StepHandle(result, plan.num_rows, plan.want_logprobs, plp)

    @staticmethod
    def collect(handle: StepHandle) -> tuple[np.ndarray, tuple | None]:
        """(token ids int32[rows], logprobs or None) of a dispatched step, where logprobs is
        (sampled f32[rows], top ids i32[rows, K], top logprobs f32[rows, K])."""
        r, n = handle.result, handle.num_rows
        tokens = np.asarray(r.token_ids)[:n]
        if not handle.want_logprobs:
            return tokens, None
        return tokens, (np.asarray(r.sampled_logprobs)[:n], np.asarray(r.top_logprob_ids)[:n],
                        np.asarray(r.top_logprobs)[:n])

    @staticmethod
    def collect_prompt_logprobs(handle: StepHandle) -> tuple[np.ndarray, ...] | None:
        """(target logprobs f32[T], target ranks i32[T], top ids i32[T, K], top logprobs
        f32[T, K]) per flat row of a prompt-logprob step; None for other steps."""
        if handle.prompt_logprobs is None:
            return None
        return tuple(np.asarray(a) for a in handle.prompt_logprobs.arrays())
