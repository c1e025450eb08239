"""MLP activations by their HF config names (`hidden_act`, Gemma's `hidden_activation`), each
computed as transformers' ACT2FN entry of that name does."""

from __future__ import annotations

import functools
from typing import Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    # torch.nn.functional.gelu(x, approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # the same formula, written out in HF
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact, with erf
}
