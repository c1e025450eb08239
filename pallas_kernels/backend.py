"""Attention backend names and the platform -> backend choice."""

from __future__ import annotations

from typing import Literal, get_args

import jax

AttentionBackend = Literal["auto", "reference", "tpu", "gpu"]
BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


def resolve_backend(name: str = "auto") -> str:
    """Map a backend name to a concrete one: "reference", "tpu" or "gpu".

    "auto" picks "tpu" on TPU, "gpu" on an NVIDIA GPU and "reference" elsewhere (CPU).
    Forcing "tpu" or "gpu" on CPU is allowed: the kernels then run in interpret mode.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda"):
        return "gpu"
    return "reference"


def interpret_mode(backend: str) -> bool:
    """True when a kernel for `backend` cannot run natively and must be interpreted."""
    platform = jax.default_backend()
    if backend == "tpu":
        return platform != "tpu"
    if backend == "gpu":
        return platform not in ("gpu", "cuda")
    return False
