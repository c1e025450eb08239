"""Every attention kernel exports for its real platform from CPU (jax.export), at Llama-3-8B
shapes: 32 q heads, 8 kv heads, head_dim 128. This catches lowering errors (primitives
or layouts a back end's lowering rejects) without an accelerator; it does not run the
kernels, and Mosaic's / Triton's own compilers (libtpu, a GPU) are not exercised here.
Interpret mode is switched off while exporting, as it would be on the real platform.
Some Mosaic lowering rules ask which TPU is attached (jax's kernel uses integer `//`, whose
sign lowering reads tpu_info.get_tpu_info()); exporting from CPU, the test answers for a
TPU v6e (`_off_platform`).
The 8-bit KV variants (int8 and fp8 e4m3 pages with their float32 scales,
pallas_kernels.kv_quant) export for our TPU and GPU kernels, the two kernels that read them."""

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from jax._src.pallas.mosaic import tpu_info

import jaxserve.kernels.attention_gpu as gpu
import jaxserve.kernels.attention_tpu as tpu
import jaxserve.kernels.attention_tpu_jax as tpu_jax
from jaxserve.kernels.kv_quant import QuantizedKV

TRITON_TARGET = "__gpu$xla.gpu.triton"     # the custom call Pallas' Triton lowering emits
KERNELS = {   # backend: (module, function, platform, custom call expected in the module)
    "pallas_tpu": (tpu, tpu.ragged_paged_attention_tpu, "tpu", "tpu_custom_call"),
    "jax_tpu": (tpu_jax, tpu_jax.ragged_paged_attention_jax_tpu, "tpu", "tpu_custom_call"),
    "pallas_gpu": (gpu, gpu.ragged_paged_attention_gpu, "cuda", TRITON_TARGET),
}
MIXES = {"decode": (64, 64), "mixed": (512, 64)}           # (tokens, max sequences)
MAX_MODEL_LEN = 4096


def _args(mix, page_size, dtype, kv_dtype=None):
    """kv_dtype: None (pages in q's dtype) or an 8-bit dtype (pages + scales, a QuantizedKV)."""
    tokens, seqs = MIXES[mix]
    pages = MAX_MODEL_LEN // page_size
    spec = jax.ShapeDtypeStruct
    kv_shape = (seqs * pages + 1, page_size, 16, 128)
    kv = (spec(kv_shape, dtype) if kv_dtype is None
          else QuantizedKV(spec(kv_shape, kv_dtype), spec(kv_shape[:3], jnp.float32)))
    return (spec((tokens, 32, 128), dtype), kv,
            spec((seqs,), jnp.int32), spec((seqs, pages), jnp.int32),
            spec((seqs + 1,), jnp.int32), spec((1,), jnp.int32))


def _off_platform(stack):
    """Interpret mode off and a TPU v6e as the attached chip, for the `with` block."""
    for m in (tpu, tpu_jax, gpu):
        stack.enter_context(mock.patch.object(m, "interpret_mode", lambda _: False))
    v6e = lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1)
    stack.enter_context(mock.patch.dict(tpu_info.registry, {jax.devices()[0].device_kind: v6e}))


def _export(backend, mix, page_size, dtype, window, cap, kv_dtype=None):
    _, fn, platform, _ = KERNELS[backend]
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)] if platform == "cuda" else []

    def call(q, kv, *rest):
        extra = {} if kv_dtype is None else dict(kv_scales=kv.scales)
        pages = kv if kv_dtype is None else kv.pages
        return fn(q, pages, *rest, sm_scale=0.088, sliding_window=window, soft_cap=cap, **extra)

    with contextlib.ExitStack() as stack:
        _off_platform(stack)
        exported = jax.export.export(jax.jit(call), platforms=(platform,), disabled_checks=checks)(
            *_args(mix, page_size, dtype, kv_dtype))
    return exported.mlir_module()


# A fraction of mix x page size x dtype x window: each value twice, every (mix, other) pair.
CASES = [("decode", 16, jnp.bfloat16, None, None), ("decode", 128, jnp.float32, 1024, None),
         ("mixed", 16, jnp.float32, 1024, 30.0), ("mixed", 128, jnp.bfloat16, None, None)]


def _params(backends, cases, ids, slow):
    """slow: {backend: indices of `cases` marked slow for it}."""
    return [pytest.param(b, *case, id=f"{i}-{b}", marks=[pytest.mark.slow] if k in slow.get(b, ()) else [])
            for k, (case, i) in enumerate(zip(cases, ids)) for b in backends]


# Our TPU kernel's exports are the slow ones (2-3 s each, Mosaic's lowering of the whole kernel): make
# test exports it here with pages of 16 (a bf16 decode; an f32 mixed batch with window and soft cap) and
# below with 8-bit pages of 128 and 16 (int8 with f32 q, window and cap; fp8 with bf16 q and a window,
# both mixed batches); the other four are slow. jax's TPU kernel and the GPU kernel export every case.
@pytest.mark.parametrize("backend,mix,page_size,dtype,window,cap", _params(
    list(KERNELS), CASES, [f"{m}-ps{p}-{jnp.dtype(d).name}-w{w}-c{c}" for m, p, d, w, c in CASES],
    slow={"pallas_tpu": {1, 3}}))
def test_kernel_exports_for_its_platform(backend, mix, page_size, dtype, window, cap):
    text = _export(backend, mix, page_size, dtype, window, cap)
    assert KERNELS[backend][3] in text


# 8-bit KV: both kv dtypes, both q dtypes, both mixes, pages of 16 and 128, with and without options.
QUANT_CASES = [("decode", 16, jnp.bfloat16, None, None, jnp.int8),
               ("mixed", 128, jnp.float32, 1024, 30.0, jnp.int8),
               ("mixed", 16, jnp.bfloat16, 1024, None, jnp.float8_e4m3fn),
               ("decode", 128, jnp.float32, None, 30.0, jnp.float8_e4m3fn)]


@pytest.mark.parametrize("backend,mix,page_size,dtype,window,cap,kv_dtype", _params(
    ["pallas_tpu", "pallas_gpu"], QUANT_CASES,
    [f"{m}-ps{p}-q{jnp.dtype(d).name}-kv{jnp.dtype(k).name}-w{w}-c{c}" for m, p, d, w, c, k in QUANT_CASES],
    slow={"pallas_tpu": {0, 3}}))
def test_kernel_exports_with_8bit_kv(backend, mix, page_size, dtype, window, cap, kv_dtype):
    text = _export(backend, mix, page_size, dtype, window, cap, kv_dtype)
    assert KERNELS[backend][3] in text
