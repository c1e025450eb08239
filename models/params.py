"""How every model parameter is made: an nnx.Param whose `out_sharding` metadata names its
logical axes (a rules table in jaxserve.sharding maps them to mesh axes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, init: str = "normal"):
    """A parameter of `shape` with logical `axes`: N(0, 0.02) ("normal"), ones or zeros."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)
