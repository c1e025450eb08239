"""The device side of multi-LoRA: writing an adapter into a slot, and each token's slot.

The LoRA slot arrays live in the model's parameters (models.lora_layers.attach_lora: per adapted
projection A [L, S, *in, R] and B [L, S, R, *out], slot 0 zeros). Loading an adapter is one
jitted program, compiled at warm-up, that writes slot s of every LoRA array in place (the arrays
are donated and keep their shardings): a device write, never a new step program. Which slot a
request reads is a per-slot column of the persistent batch (`SlotState.lora_slot`, written when
the request gets its batch slot); the step derives each token's adapter slot from it on the
device (`token_lora_slots`), so the host sends nothing per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.models.lora_layers import lora_paths


class LoRAWriter:
    """Writes whole adapters into slots of a model state's LoRA arrays (see the module docstring)."""

    def __init__(self, params, paths: list[tuple]):
        variables = dict(nnx.to_flat_state(params))
        self.paths = paths
        self._vars = {p: variables[p] for p in paths}
        self.num_slots = next(iter(self._vars.values())).get_value().shape[1]
        shardings = {p: v.get_value().sharding for p, v in self._vars.items()}
        # (a fresh partial: its jit cache, the compile count, is this writer's own)
        self.program = jax.jit(functools.partial(_write_slot), donate_argnums=(0,), out_shardings=shardings)

    @classmethod
    def for_params(cls, params) -> "LoRAWriter | None":
        """A writer for the model state's LoRA arrays, or None when the model has none."""
        paths = lora_paths(params)
        return cls(params, paths) if paths else None

    def slot_shapes(self) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
        """path -> (shape, dtype) of one slot's contents ([L, *in, R] or [L, R, *out])."""
        out = {}
        for p, v in self._vars.items():
            a = v.get_value()
            out[p] = ((a.shape[0], *a.shape[2:]), a.dtype)
        return out

    def write(self, slot: int, arrays: dict[tuple, np.ndarray]) -> None:
        """Slot `slot` of every LoRA array := arrays[path] (the whole slot, every layer)."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"LoRA slot {slot} out of range [0, {self.num_slots})")
        current = {p: v.get_value() for p, v in self._vars.items()}
        new = self.program(current, np.asarray(slot, np.int32), {p: arrays[p] for p in self.paths})
        for p, v in self._vars.items():
            v.set_value(new[p])

    def warm_up(self) -> None:
        """Compiles the write by writing zeros into slot 0 (which holds zeros: no adapter)."""
        self.write(0, {p: np.zeros(shape, dt) for p, (shape, dt) in self.slot_shapes().items()})


def _write_slot(current: dict, slot: jax.Array, new: dict) -> dict:
    """current: path -> [L, S, ...] (donated); new: path -> [L, ...] -> current with [:, slot] = new."""
    return {p: a.at[:, slot].set(new[p].astype(a.dtype)) for p, a in current.items()}


def token_lora_slots(lora_slot: jax.Array, seq_slots: jax.Array, cu_q_lens: jax.Array, num_tokens: int) -> jax.Array:
    """Each token's adapter slot: lora_slot i32[N] (per batch slot), seq_slots i32[S] (the step's
    sequences' batch slots), cu_q_lens i32[S + 1] -> i32[T] (T = num_tokens, static). Tokens past
    the last sequence read a padding sequence's batch slot, whose adapter slot is 0."""
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, tok, side="right") - 1, 0, seq_slots.shape[0] - 1)  # [T]
    return lora_slot[seq_slots[seq]]
