"""The token bitmask of structured outputs, on the device.

A bitmask is int32[R, W], W = ceil(V / 32): bit b of word w of row r allows token 32 w + b
(little-endian bit order, llguidance's and xgrammar's layout). It is always an input of the
sampler program, so constrained and plain steps run the same compiled program: a plain step
passes a device-resident all-ones mask of its row bucket (no host-to-device copy), a
constrained step the host's mask. Masked tokens get -inf before sampling; the unpacking runs
only when some bit is clear (lax.cond), so a plain step pays one compare over [R, W].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def allow_all(rows: int, words: int) -> np.ndarray:
    """The all-ones mask int32[rows, words] (every token allowed)."""
    return np.full((rows, words), -1, np.int32)


def unpack_bitmask(bitmask: jax.Array, vocab: int) -> jax.Array:
    """int32[R, W] -> bool[R, vocab]: allowed tokens."""
    shifts = jnp.arange(32, dtype=jnp.int32)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [R, W, 32]; >> on int32 is arithmetic, & 1 keeps bit b
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab] == 1


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits f32[R, V] with disallowed tokens set to -inf; rows whose mask is all ones are
    unchanged bit for bit. Raises ValueError on mismatched shapes."""
    r, v = logits.shape
    if bitmask.ndim != 2 or bitmask.shape[0] != r or bitmask.shape[1] * 32 < v:
        raise ValueError(f"bitmask must be int32[{r}, >= {-(-v // 32)}], got {bitmask.dtype}{list(bitmask.shape)}")
    if bitmask.dtype != jnp.int32:
        raise ValueError(f"bitmask must be int32, got {bitmask.dtype}")

    def masked(x):
        return jnp.where(unpack_bitmask(bitmask, v), x, -jnp.inf)

    return lax.cond(jnp.any(bitmask != -1), masked, lambda x: x, logits)
