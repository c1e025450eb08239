"""Without an accelerator, the kernels must at least lower: Mosaic MLIR for TPU and Triton
IR for GPU (this catches primitives the back ends do not support, e.g. gather in Triton).
Compiling that IR needs libtpu / a GPU and is not covered here."""

from unittest import mock

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels.attention_gpu as gpu
import pallas_kernels.attention_tpu as tpu
from rpa_batch import make_batch


def _lower(module, fn, platform, dtype, **opts):
    batch = make_batch([(1, 40), (20, 20), (3, 50)], page_size=16, num_q_heads=8,
                       num_kv_heads=2, head_dim=128, max_seqs=4, num_tokens=32, dtype=dtype)
    with mock.patch.object(module, "interpret_mode", lambda _: False):
        step = jax.jit(lambda *a: fn(*a, sm_scale=0.1, **opts))
        return step.trace(*batch.args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernel_lowers_to_mosaic(dtype):
    text = _lower(tpu, tpu.ragged_paged_attention_tpu, "tpu", dtype, sliding_window=8,
                  soft_cap=3.0)
    assert "tpu_custom_call" in text


def test_gpu_kernel_lowers_to_triton():
    text = _lower(gpu, gpu.ragged_paged_attention_gpu, "cuda", jnp.bfloat16, sliding_window=8,
                  soft_cap=3.0)
    assert "triton" in text
