"""Attention backend names and the platform -> backend choice.

Concrete backends (what each name runs):
  reference   dense pure-JAX oracle: every query token against its whole block table (tests)
  xla         pure-JAX path whose work follows each sequence's real context (CPU default,
              and the fallback on every platform)
  jax_tpu     the ragged paged attention kernel jax ships for TPU, with its tuned block
              sizes (TPU default)
  pallas_tpu  our TPU kernel (Mosaic)
  pallas_gpu  our GPU kernel (Pallas' Triton back end; GPU default)
Aliases: "auto" picks by platform; "tpu" and "gpu" name the platform's default kernel.
An 8-bit KV cache (pallas_kernels.kv_quant) is read by every backend but jax_tpu (jax's kernel
takes 8-bit pages only with one static per-tensor scale); with one, the TPU default is ours.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax

AttentionBackend = Literal["auto", "reference", "xla", "jax_tpu", "pallas_tpu", "pallas_gpu", "tpu", "gpu"]
BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
CONCRETE_BACKENDS: tuple[str, ...] = ("reference", "xla", "jax_tpu", "pallas_tpu", "pallas_gpu")
ALIASES: dict[str, str] = {"tpu": "jax_tpu", "gpu": "pallas_gpu"}
# Backends that read an 8-bit KV cache (kv_quant.QuantizedKV: a scale per token and kv head).
QUANTIZED_KV_BACKENDS: tuple[str, ...] = ("reference", "xla", "pallas_tpu", "pallas_gpu")
# The platform a kernel is written for; the others run anywhere XLA does.
KERNEL_PLATFORM: dict[str, str] = {"jax_tpu": "tpu", "pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def resolve_backend(name: str = "auto", quantized_kv: bool = False) -> str:
    """Map a backend name to a concrete one (see the module docstring).

    "auto" picks "jax_tpu" on TPU, "pallas_gpu" on an NVIDIA GPU and "xla" elsewhere (CPU).
    Forcing a kernel off its platform is allowed: it then runs in interpret mode.
    quantized_kv: the KV cache is 8-bit; "auto" and "tpu" then pick "pallas_tpu" on TPU,
    and a backend that cannot read it is refused (ValueError naming it).
    """
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    concrete = _resolve(name)
    if quantized_kv and concrete == "jax_tpu" and name in ("auto", "tpu"):
        concrete = "pallas_tpu"
    if quantized_kv and concrete not in QUANTIZED_KV_BACKENDS:
        raise ValueError(f"attention backend {concrete!r} cannot read an 8-bit (int8 / fp8) KV cache: jax's TPU "
                         f"kernel takes 8-bit pages only with one static per-tensor k_scale / v_scale, and this "
                         f"cache has a scale per token and kv head; use one of {QUANTIZED_KV_BACKENDS}")
    return concrete


def _resolve(name: str) -> str:
    if name in ALIASES:
        return ALIASES[name]
    if name != "auto":
        return name
    platform = jax.default_backend()
    if platform == "tpu":
        return "jax_tpu"
    if platform in ("gpu", "cuda"):
        return "pallas_gpu"
    return "xla"


def is_kernel(backend: str) -> bool:
    """True for a Pallas kernel (opaque to XLA's partitioner: runs per device under shard_map)."""
    return resolve_backend(backend) in KERNEL_PLATFORM


def interpret_mode(backend: str) -> bool:
    """True when a kernel for `backend` cannot run natively and must be interpreted."""
    platform = jax.default_backend()
    target = KERNEL_PLATFORM.get(resolve_backend(backend))
    if target == "tpu":
        return platform != "tpu"
    if target == "gpu":
        return platform not in ("gpu", "cuda")
    return False
