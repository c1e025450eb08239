"""AttentionMetadata: the device-side description of one ragged batch of tokens.

Built on the host (numpy) by the model runner, padded to a precompiled bucket, and passed into
the jitted step as a pytree. T = padded tokens this step, S = padded sequences this step.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array  # int32[T]     page * page_size + offset; padded tokens -> null page 0
    block_tables: jax.Array  # int32[S, max_pages_per_seq]
    kv_lens: jax.Array  # int32[S]     context length of each sequence after this step
    cu_q_lens: jax.Array  # int32[S + 1] start of each sequence's tokens in the flat batch
    num_seqs: jax.Array  # int32[1]     sequences >= num_seqs are padding
    # int32[T] each token's LoRA adapter slot (0: none; models.lora_layers); None: no adapters in the model
    lora_slots: jax.Array | None = None


def single_sequence_metadata(
    pages: list[int], page_size: int, max_pages_per_seq: int, start: int, num_tokens: int
) -> AttentionMetadata:
    """Metadata for one sequence whose tokens [start, start + num_tokens) are computed this step."""
    positions = np.arange(start, start + num_tokens)
    pages_arr = np.asarray(pages, dtype=np.int32)
    slots = pages_arr[positions // page_size] * page_size + positions % page_size
    table = np.zeros((1, max_pages_per_seq), np.int32)
    table[0, : len(pages)] = pages_arr
    return AttentionMetadata(
        slot_mapping=slots.astype(np.int32),
        block_tables=table,
        kv_lens=np.asarray([start + num_tokens], np.int32),
        cu_q_lens=np.asarray([0, num_tokens], np.int32),
        num_seqs=np.asarray([1], np.int32),
    )
