"""The persistent batch: per-slot state that lives on the device between steps, and the
host side that turns each SchedulerOutput into small diffs of it.

Every running request holds a *slot* (a row of `SlotState`) from its first scheduled step
until the scheduler reports it released (finish, abort, preemption). What a request needs
on the device is written once, when it gets its slot: its sampling parameters, logit bias,
min_tokens ban, its block table row and, when it uses penalties, its prompt mask and output
counts. After that a step only sends what changed:

    block-table cells      pages a step appended (or replaced copy-on-write), and null
                           pages where a sliding window freed the leading pages
    per-step inputs        host token ids (-1 where the device feeds the token forward),
                           the sequences' slots and query lengths, the sampled rows

Context lengths (`seq_lens`), the last sampled token, the output count and the penalty
counts are advanced by the step programs themselves, so the host never rebuilds them. The
last slot (PAD_SLOT = max_num_seqs) is padding: neutral parameters, an all-null block table.

Shapes: N = max_num_seqs + 1 slots, M = pages per sequence, V = vocabulary, B = bias entries,
T = token bucket, S = sequences of the body program, R = rows bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.core.request import Request
from jaxserve.core.scheduler import ScheduledSeq, SchedulerOutput
from jaxserve.core.step_shapes import StepShapes, pick_bucket
from jaxserve.worker.sampler import SEED_MODULUS

MAX_BIAS_ENTRIES = 64  # logit_bias entries + tokens banned by min_tokens, per request
CELL_BUCKET = 1024  # cells per write program call; more are written in several calls
RESET_ROWS = 8  # penalty rows cleared per reset program call


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    block_tables: jax.Array  # i32[N, M]
    seq_lens: jax.Array  # i32[N]   tokens with KV in the cache before the next step
    last_tokens: jax.Array  # i32[N]   the slot's newest sampled token (fed to its next step)
    num_output: jax.Array  # i32[N]   tokens the slot's request generated (the PRNG step)
    temperature: jax.Array  # f32[N]
    top_k: jax.Array  # i32[N]
    top_p: jax.Array  # f32[N]
    min_p: jax.Array  # f32[N]
    repetition_penalty: jax.Array  # f32[N]
    presence_penalty: jax.Array  # f32[N]
    frequency_penalty: jax.Array  # f32[N]
    seeds: jax.Array  # i32[N]
    min_tokens: jax.Array  # i32[N]
    want_logprobs: jax.Array  # bool[N]
    num_prompt: jax.Array  # i32[N]   prompt length of the slot's request (picks longrope factors)
    bias_token_ids: jax.Array  # i32[N, B], -1 padded
    bias_values: jax.Array  # f32[N, B]
    bias_is_ban: jax.Array  # bool[N, B]  -inf while num_output < min_tokens, else 0
    prompt_mask: jax.Array  # bool[N, V]  prompt tokens (repetition penalty)
    output_counts: jax.Array  # i32[N, V]  output token counts (penalties)
    lora_slot: jax.Array  # i32[N]   the request's LoRA adapter slot (0: none; worker.lora_slots)


# Per-slot scalar columns written when a request gets its slot, with their neutral values.
SLOT_COLUMNS = {
    "seq_lens": (np.int32, 0), "num_output": (np.int32, 0), "temperature": (np.float32, 0.0),
    "top_k": (np.int32, 0), "top_p": (np.float32, 1.0), "min_p": (np.float32, 0.0),
    "repetition_penalty": (np.float32, 1.0), "presence_penalty": (np.float32, 0.0),
    "frequency_penalty": (np.float32, 0.0), "seeds": (np.int32, 0), "min_tokens": (np.int32, 0),
    "want_logprobs": (np.bool_, False), "num_prompt": (np.int32, 0), "lora_slot": (np.int32, 0),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotAssignment:
    """New slots' rows; K = assignment bucket. Padding entries have slot N (dropped)."""

    slots: jax.Array  # i32[K]
    columns: dict  # name -> [K] (SLOT_COLUMNS)
    bias_token_ids: jax.Array  # i32[K, B]
    bias_values: jax.Array  # f32[K, B]
    bias_is_ban: jax.Array  # bool[K, B]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cells:
    """Sparse writes; E = CELL_BUCKET, padding indices are out of range (dropped)."""

    table_index: jax.Array  # i32[E]  flat index into block_tables
    table_value: jax.Array  # i32[E]
    prompt_index: jax.Array  # i32[E]  flat index into prompt_mask (set True)
    output_index: jax.Array  # i32[E]  flat index into output_counts (add 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BodyInputs:
    host_ids: jax.Array  # i32[T]   token id, or -1: the slot's last_tokens (a placeholder)
    cu_q_lens: jax.Array  # i32[S + 1]
    seq_slots: jax.Array  # i32[S]   padding sequences -> PAD_SLOT
    num_seqs: jax.Array  # i32[1]
    logits_rows: jax.Array  # i32[max_num_seqs * C]  flat-batch row of each sample row (C rows per sample
    #                         row with speculative decoding, worker.spec_decode; C = 1 without)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleInputs:
    row_slots: jax.Array  # i32[R]  slot whose parameters and penalty state the row uses
    row_sample_index: jax.Array  # i32[R]  sample of the request (folded into its PRNG key)
    row_owner: jax.Array  # bool[R]  the row's token is the slot's own next token
    # i32[R, ceil(V / 32)] allowed tokens (worker.bitmask); the runner sets it at dispatch
    bitmask: jax.Array | None = None


@dataclasses.dataclass
class StepPlan:
    """Host arrays of one step, in the order the runner dispatches them."""

    resets: list[np.ndarray]
    assignment: SlotAssignment | None
    cells: list[Cells]  # the last chunk rides with the body program; others run before it
    body: BodyInputs
    sample: SampleInputs
    num_rows: int
    want_logprobs: bool


def init_slot_state(num_slots: int, max_pages: int, vocab: int) -> SlotState:
    """All slots neutral (greedy, no penalties, null pages)."""
    n = num_slots
    cols = {name: np.full(n, pad, dt) for name, (dt, pad) in SLOT_COLUMNS.items()}
    return SlotState(block_tables=np.zeros((n, max_pages), np.int32), last_tokens=np.zeros(n, np.int32),
                     bias_token_ids=np.full((n, MAX_BIAS_ENTRIES), -1, np.int32),
                     bias_values=np.zeros((n, MAX_BIAS_ENTRIES), np.float32),
                     bias_is_ban=np.zeros((n, MAX_BIAS_ENTRIES), np.bool_),
                     prompt_mask=np.zeros((n, vocab), np.bool_), output_counts=np.zeros((n, vocab), np.int32), **cols)


class _CellWriter:
    """Accumulates flat-index cells and cuts them into CELL_BUCKET-sized chunks."""

    def __init__(self, table_size: int, penalty_size: int):
        self.table_size, self.penalty_size = table_size, penalty_size
        self.table_index: list[np.ndarray] = []
        self.table_value: list[np.ndarray] = []
        self.prompt_index: list[np.ndarray] = []
        self.output_index: list[np.ndarray] = []

    def chunks(self) -> list[Cells]:
        parts = [(self.table_index, self.table_size), (self.table_value, 0),
                 (self.prompt_index, self.penalty_size), (self.output_index, self.penalty_size)]
        flat = [np.concatenate(p).astype(np.int32) if p else np.zeros(0, np.int32) for p, _ in parts]
        n = max(len(flat[0]), len(flat[2]), len(flat[3]), 1)  # at least one (padding) chunk
        out = []
        for lo in range(0, n, CELL_BUCKET):
            arrays = []
            for a, (_, pad) in zip(flat, parts):
                chunk = np.full(CELL_BUCKET, pad, np.int32)
                part = a[lo:lo + CELL_BUCKET]
                chunk[:len(part)] = part
                arrays.append(chunk)
            out.append(Cells(*arrays))
        return out


class InputBatch:
    """Host owner of the slots: which request holds which, and the diffs of each step."""

    def __init__(self, shapes: StepShapes, *, max_pages_per_seq: int, vocab_size: int, page_size: int,
                 block_table_fn: Callable[[str], Sequence[int]]):
        self.shapes = shapes
        self.max_num_seqs = shapes.max_num_seqs
        self.pad_slot = shapes.max_num_seqs
        self.num_slots = shapes.max_num_seqs + 1
        self.max_pages = max_pages_per_seq
        self.vocab = vocab_size
        self.page_size = page_size
        self.block_table_fn = block_table_fn  # request id -> its live page list
        self.slot_of: dict[str, int] = {}
        self._num_null = [0] * self.num_slots  # leading null block-table entries on the device
        self._free = list(range(self.max_num_seqs - 1, -1, -1))  # pop() hands out low slots first
        self.assignment_buckets = tuple(sorted({min(16, self.max_num_seqs), self.max_num_seqs}))
        self.group_size = 1  # C: logits rows per sample row (1 + num_speculative_tokens when speculating)

    def release(self, request_ids: Sequence[str]) -> None:
        """Frees the slots of requests whose pages the scheduler released. A step still on
        the device may write its last token there; the next owner's assignment runs after."""
        for rid in request_ids:
            slot = self.slot_of.pop(rid, None)
            if slot is not None:
                self._free.append(slot)

    def prepare(self, out: SchedulerOutput) -> StepPlan:
        """The step's diffs and inputs; `release(out.released)` must have run first."""
        cells = _CellWriter(self.num_slots * self.max_pages, self.num_slots * self.vocab)
        new: list[tuple[int, Request, int]] = []
        resets: list[int] = []
        n_seqs = len(out.seqs)
        seq_slots = np.empty(n_seqs, np.int32)
        q_lens = np.empty(n_seqs, np.int32)
        ids: list[int] = []
        row_slots: list[int] = []
        row_index: list[int] = []
        row_owner: list[bool] = []
        want_logprobs = False
        for i, s in enumerate(out.seqs):
            req = s.request
            slot = self.slot_of.get(req.request_id)
            if slot is None:
                slot = self._assign(req, s.start, new, resets, cells)  # the whole row, nulls too
                self._num_null[slot] = s.num_null_pages
            else:
                self._table_diff(slot, s, cells)
            seq_slots[i], q_lens[i] = slot, s.num_new_tokens
            end = s.start + s.num_new_tokens
            known = min(end, req.num_tokens)
            ids += req.token_ids[s.start:known]
            if end > known:  # placeholders: the device feeds the tokens its last step sampled
                ids += list(s.draft_token_ids) or [-1] * (end - known)  # (or the proposals it verifies)
            if s.num_samples:
                want_logprobs |= req.params.logprobs is not None
                row_slots += [slot] * s.num_samples
                if s.num_samples == 1:
                    row_index.append(req.sample_index)
                    row_owner.append(True)
                else:  # the last prompt token of an n > 1 request: rows of samples 0..n-1
                    row_index += range(s.num_samples)
                    row_owner += [True] + [False] * (s.num_samples - 1)
        t, r = self.shapes.check(out.num_tokens, n_seqs, len(row_slots))
        return StepPlan(
            resets=[self._pad(resets[k:k + RESET_ROWS], RESET_ROWS, self.num_slots)
                    for k in range(0, len(resets), RESET_ROWS)],
            assignment=self._assignment(new) if new else None,
            cells=cells.chunks(),
            body=self._body_inputs(t, ids, seq_slots, q_lens, out, row_slots),
            sample=SampleInputs(self._pad(row_slots, r, self.pad_slot), self._pad(row_index, r, 0),
                                self._pad(row_owner, r, False, np.bool_)),
            num_rows=len(row_slots), want_logprobs=want_logprobs)

    def _table_diff(self, slot: int, s: ScheduledSeq, cells: _CellWriter) -> None:
        """Block-table cells of a slot that already holds its row: the null page where the
        window freed pages since the last step, then the pages appended or replaced
        copy-on-write (both at or after start's page)."""
        lo, hi = self._num_null[slot], s.num_null_pages
        if hi > lo:
            cells.table_index.append(slot * self.max_pages + np.arange(lo, hi))
            cells.table_value.append(np.zeros(hi - lo, np.int32))
            self._num_null[slot] = hi
        if s.num_new_pages:
            table = self.block_table_fn(s.request.request_id)
            first = s.start // self.page_size
            cells.table_index.append(slot * self.max_pages + np.arange(first, len(table)))
            cells.table_value.append(np.asarray(table[first:], np.int32))

    def _assign(self, req: Request, start: int, new: list, resets: list, cells: _CellWriter) -> int:
        """Gives the request a slot; its rows are written by this step's diff."""
        slot = self._free.pop()
        self.slot_of[req.request_id] = slot
        new.append((slot, req, start))
        table = self.block_table_fn(req.request_id)
        cells.table_index.append(slot * self.max_pages + np.arange(len(table)))
        cells.table_value.append(np.asarray(table, np.int32))
        if req.params.needs_penalties:
            resets.append(slot)
            if req.params.repetition_penalty != 1.0:
                cells.prompt_index.append(slot * self.vocab + np.asarray(req.prompt_token_ids, np.int64))
            if req.num_output_tokens:  # resumed after preemption, or a forked sample
                cells.output_index.append(slot * self.vocab + np.asarray(req.output_token_ids, np.int64))
        return slot

    def _assignment(self, new: list[tuple[int, Request, int]]) -> SlotAssignment:
        k = pick_bucket(self.assignment_buckets, len(new))
        cols = {name: np.full(k, pad, dt) for name, (dt, pad) in SLOT_COLUMNS.items()}
        slots = np.full(k, self.num_slots, np.int32)
        bias_ids = np.full((k, MAX_BIAS_ENTRIES), -1, np.int32)
        bias_values = np.zeros((k, MAX_BIAS_ENTRIES), np.float32)
        bias_ban = np.zeros((k, MAX_BIAS_ENTRIES), np.bool_)
        for j, (slot, req, start) in enumerate(new):
            p = req.params
            slots[j] = slot
            values = dict(seq_lens=start, num_output=req.num_output_tokens,
                          temperature=0.0 if p.is_greedy else p.temperature, top_k=min(p.top_k, self.vocab),
                          top_p=p.top_p, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                          presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                          seeds=req.seed % SEED_MODULUS, min_tokens=p.min_tokens,
                          want_logprobs=p.logprobs is not None, num_prompt=req.num_prompt_tokens,
                          lora_slot=req.lora_slot)
            for name, v in values.items():
                cols[name][j] = v
            bias = list(p.logit_bias or ())
            banned = req.min_tokens_banned_ids()
            m = len(bias)
            bias_ids[j, :m] = [tid for tid, _ in bias]
            bias_values[j, :m] = [v for _, v in bias]
            bias_ids[j, m:m + len(banned)] = banned
            bias_ban[j, m:m + len(banned)] = True
        return SlotAssignment(slots, cols, bias_ids, bias_values, bias_ban)

    def _body_inputs(self, t: int, ids: list[int], seq_slots: np.ndarray, q_lens: np.ndarray,
                     out: SchedulerOutput, row_slots: list[int]) -> BodyInputs:
        s = self.shapes.seqs(t)
        n = len(seq_slots)
        host_ids = np.zeros(t, np.int32)
        host_ids[:len(ids)] = ids
        cu = np.full(s + 1, out.num_tokens, np.int32)
        cu[0] = 0
        np.cumsum(q_lens, out=cu[1:n + 1])
        c = self.group_size
        rows = np.zeros(self.max_num_seqs * c, np.int32)
        samples = np.fromiter((q.num_samples for q in out.seqs), np.int32, n)
        drafts = np.fromiter((len(q.draft_token_ids) for q in out.seqs), np.int32, n)
        # Group of C rows per sample row: the chunk's last 1 + k tokens (k proposals), then repeats.
        first = np.repeat(cu[1:n + 1] - 1 - drafts, samples)
        span = np.repeat(drafts, samples)
        rows[:len(first) * c] = (first[:, None] + np.minimum(np.arange(c)[None, :], span[:, None])).reshape(-1)
        return BodyInputs(host_ids, cu, self._pad(seq_slots, s, self.pad_slot), np.asarray([n], np.int32), rows)

    @staticmethod
    def _pad(values, size: int, pad, dtype=np.int32) -> np.ndarray:
        out = np.full(size, pad, dtype)
        out[:len(values)] = values
        return out


def apply_assignment(state: SlotState, a: SlotAssignment) -> SlotState:
    """Writes new slots' rows (padding entries, slot N, are dropped)."""
    updates = {name: getattr(state, name).at[a.slots].set(v, mode="drop") for name, v in a.columns.items()}
    return dataclasses.replace(
        state, **updates,
        bias_token_ids=state.bias_token_ids.at[a.slots].set(a.bias_token_ids, mode="drop"),
        bias_values=state.bias_values.at[a.slots].set(a.bias_values, mode="drop"),
        bias_is_ban=state.bias_is_ban.at[a.slots].set(a.bias_is_ban, mode="drop"))


def apply_cells(state: SlotState, c: Cells) -> SlotState:
    n, m = state.block_tables.shape
    v = state.prompt_mask.shape[1]
    table = state.block_tables.reshape(-1).at[c.table_index].set(c.table_value, mode="drop").reshape(n, m)
    prompt = state.prompt_mask.reshape(-1).at[c.prompt_index].set(True, mode="drop").reshape(n, v)
    counts = state.output_counts.reshape(-1).at[c.output_index].add(1, mode="drop").reshape(n, v)
    return dataclasses.replace(state, block_tables=table, prompt_mask=prompt, output_counts=counts)


def reset_penalty_rows(state: SlotState, rows: jax.Array) -> SlotState:
    """rows i32[RESET_ROWS] (padding: N, dropped): clears their prompt mask and counts."""
    return dataclasses.replace(state, prompt_mask=state.prompt_mask.at[rows].set(False, mode="drop"),
                               output_counts=state.output_counts.at[rows].set(0, mode="drop"))


def step_positions(state: SlotState, inp: BodyInputs, page_size: int):
    """Derives the step's token positions, input ids and attention inputs on the device.
    Returns (input_ids [T], positions [T], slot_mapping [T], kv_lens [S], block_tables [S, M])."""
    t = inp.host_ids.shape[0]
    s = inp.seq_slots.shape[0]
    q_lens = inp.cu_q_lens[1:] - inp.cu_q_lens[:-1]  # [S]
    starts = state.seq_lens[inp.seq_slots]  # [S]
    kv_lens = starts + q_lens
    tok = jnp.arange(t, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(inp.cu_q_lens, tok, side="right") - 1, 0, s - 1)  # [T]
    valid = tok < inp.cu_q_lens[inp.num_seqs[0]]
    positions = jnp.where(valid, starts[seq] + tok - inp.cu_q_lens[seq], 0)
    slot = inp.seq_slots[seq]  # [T]
    input_ids = jnp.where(inp.host_ids >= 0, inp.host_ids, state.last_tokens[slot])
    m = state.block_tables.shape[1]
    page = state.block_tables.reshape(-1)[slot * m + jnp.minimum(positions // page_size, m - 1)]
    slot_mapping = jnp.where(valid, page * page_size + positions % page_size, 0)
    return input_ids, positions, slot_mapping, kv_lens, state.block_tables[inp.seq_slots]


def rope_lengths(state: SlotState, inp: BodyInputs, positions: jax.Array) -> jax.Array:
    """The length that picks each token's RoPE factors (longrope; see models.rope): its request's
    prompt length for prompt tokens, position + 1 after the prompt. It depends on the request and
    the position only, so chunked prefill, batching and recomputation after preemption give
    every token the factors it had the first time. positions [T] -> int32[T]."""
    t, s = positions.shape[0], inp.seq_slots.shape[0]
    tok = jnp.arange(t, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(inp.cu_q_lens, tok, side="right") - 1, 0, s - 1)  # [T]
    return jnp.maximum(state.num_prompt[inp.seq_slots[seq]], positions + 1)
