"""Public ragged paged attention op: validation, then dispatch to one implementation.

Shapes (T padded tokens, S max sequences, P pages):
  q             [T, Hq, D]              any float dtype; Hq % Hkv == 0
  kv_pages      [P, page_size, 2*Hkv, D] K of kv head h at 2h, V at 2h+1; page 0 = null page
                or a kv_quant.QuantizedKV: 8-bit pages of that shape and float32 scales
                [P, page_size, 2*Hkv] (one per token and combined head), dequantized
                inside each backend's kernel
  kv_lens       int32 [S]               context length after this step (new tokens included)
  block_tables  int32 [S, max_pages_per_seq]
  cu_q_lens     int32 [S + 1]           q row offsets; seq i owns rows cu_q_lens[i]:cu_q_lens[i+1]
  num_seqs      int32 [1]               sequences >= num_seqs are padding
  -> out        [T, Hq, D] in q.dtype; padding rows are zeros.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from jaxserve.kernels.attention_reference import ragged_paged_attention_reference
from jaxserve.kernels.backend import resolve_backend
from jaxserve.kernels.kv_quant import QuantizedKV, is_quantized_dtype

# Tuning knobs each backend accepts (static keyword arguments).
TUNING_KEYS: dict[str, frozenset[str]] = {
    "reference": frozenset({"token_chunk"}),
    "xla": frozenset({"num_kv_pages_per_block", "num_q_per_block"}),
    "jax_tpu": frozenset({"num_q_per_block", "num_kv_pages_per_block", "vmem_limit_bytes"}),
    "pallas_tpu": frozenset({"num_q_per_block", "num_kv_pages_per_block", "vmem_limit_bytes"}),
    "pallas_gpu": frozenset({"num_q_per_block", "num_kv_pages_per_block", "num_kv_splits",
                             "num_warps", "num_stages"}),
}


def _shape_error(name: str, expected: str, x) -> ValueError:
    return ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)} dtype {x.dtype}")


def _check_int32(name: str, x, shape: tuple[int, ...], expected: str) -> None:
    if tuple(x.shape) != shape or x.dtype != jnp.int32:
        raise _shape_error(name, f"int32 {expected} = {shape}", x)


def validate_attention_args(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                            sm_scale, sliding_window, soft_cap) -> None:
    """Raise ValueError naming the first offending argument."""
    if q.ndim != 3 or not jnp.issubdtype(q.dtype, jnp.floating):
        raise _shape_error("q", "a float [num_tokens, num_q_heads, head_dim] array", q)
    if isinstance(kv_pages, QuantizedKV):
        kv_pages = kv_pages.pages           # QuantizedKV checked its scales on construction
    elif is_quantized_dtype(kv_pages.dtype):
        raise ValueError(f"kv_pages of dtype {kv_pages.dtype} need their scales: pass a "
                         "pallas_kernels.kv_quant.QuantizedKV (pages and scales)")
    if (kv_pages.ndim != 4 or not (jnp.issubdtype(kv_pages.dtype, jnp.floating)
                                   or is_quantized_dtype(kv_pages.dtype))
            or kv_pages.shape[2] % 2):
        raise _shape_error("kv_pages", "a float [num_pages, page_size, 2*num_kv_heads, head_dim]"
                           " array", kv_pages)
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_pages.shape[2] // 2
    if kv_pages.shape[3] != head_dim:
        raise _shape_error("kv_pages", f"[..., ..., ..., head_dim={head_dim}] to match q", kv_pages)
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"q heads must be a multiple of kv heads: q has {num_q_heads} heads, "
                         f"kv_pages has {num_kv_heads} kv heads (axis 2 = {kv_pages.shape[2]})")
    if kv_lens.ndim != 1:
        raise _shape_error("kv_lens", "int32 [max_num_seqs]", kv_lens)
    max_seqs = kv_lens.shape[0]
    _check_int32("kv_lens", kv_lens, (max_seqs,), "[max_num_seqs]")
    if block_tables.ndim != 2 or block_tables.shape[0] != max_seqs:
        raise _shape_error("block_tables", f"int32 [max_num_seqs={max_seqs}, max_pages_per_seq]",
                           block_tables)
    _check_int32("block_tables", block_tables, tuple(block_tables.shape),
                 "[max_num_seqs, max_pages_per_seq]")
    _check_int32("cu_q_lens", cu_q_lens, (max_seqs + 1,), "[max_num_seqs + 1]")
    _check_int32("num_seqs", num_seqs, (1,), "[1]")
    if not isinstance(sm_scale, numbers.Real):
        raise ValueError(f"sm_scale must be a Python float, got {sm_scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, numbers.Integral)
                                       or sliding_window <= 0):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    if soft_cap is not None and (not isinstance(soft_cap, numbers.Real) or soft_cap <= 0):
        raise ValueError(f"soft_cap must be None or a positive float, got {soft_cap!r}")


def _check_tuning(backend: str, tuning: dict) -> None:
    unknown = set(tuning) - TUNING_KEYS[backend]
    if unknown:
        raise ValueError(f"tuning for backend {backend!r} accepts {sorted(TUNING_KEYS[backend])}, "
                         f"got unknown {sorted(unknown)}")
    for key, value in tuning.items():
        if not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"tuning {key} must be a positive int, got {value!r}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                             "backend", "tuning"))
def _dispatch(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *, sm_scale,
              sliding_window, soft_cap, backend, tuning):
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  **dict(tuning))
    if isinstance(kv_pages, QuantizedKV):
        kv_pages, kwargs["kv_scales"] = kv_pages.pages, kv_pages.scales
    args = (q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
    if backend == "xla":
        from jaxserve.kernels.attention_xla import ragged_paged_attention_xla
        return ragged_paged_attention_xla(*args, **kwargs)
    if backend == "jax_tpu":
        from jaxserve.kernels.attention_tpu_jax import ragged_paged_attention_jax_tpu
        return ragged_paged_attention_jax_tpu(*args, **kwargs)
    if backend == "pallas_tpu":
        from jaxserve.kernels.attention_tpu import ragged_paged_attention_tpu
        return ragged_paged_attention_tpu(*args, **kwargs)
    if backend == "pallas_gpu":
        from jaxserve.kernels.attention_gpu import ragged_paged_attention_gpu
        return ragged_paged_attention_gpu(*args, **kwargs)
    return ragged_paged_attention_reference(*args, **kwargs)


def ragged_paged_attention(q: jax.Array, kv_pages: jax.Array | QuantizedKV, kv_lens: jax.Array,
                           block_tables: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array,
                           *, sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, backend: str = "auto",
                           **tuning: int) -> jax.Array:
    """Causal grouped-query attention over a ragged batch of paged sequences.

    See the module docstring for shapes. sliding_window W: a query at position p sees keys
    in (p - W, p]. soft_cap c: logits = c * tanh(logits / c) (after sm_scale). Softmax runs
    in float32. backend: one of pallas_kernels.backend.BACKENDS ("auto" picks by platform;
    kernels forced off their platform are interpreted). `tuning` holds backend-specific block sizes (see TUNING_KEYS). Usable inside jit.
    """
    validate_attention_args(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    concrete = resolve_backend(backend, quantized_kv=isinstance(kv_pages, QuantizedKV))
    _check_tuning(concrete, tuning)
    return _dispatch(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                     sm_scale=float(sm_scale),
                     sliding_window=None if sliding_window is None else int(sliding_window),
                     soft_cap=None if soft_cap is None else float(soft_cap),
                     backend=concrete, tuning=tuple(sorted(tuning.items())))
