"""Weight quantization (issue 15, weight half): per-output-channel symmetric int8 / fp8 e4m3.

A quantized linear weight is two parameters: the values `w` in int8 or float8_e4m3fn (w's own
shape and logical axes) and `w_scale` in float32 with w's shape, size 1 on the axes the matmul
contracts (logical axis None there: a size-1 axis is never split), so that w ~= q * scale.
Because the scale is constant along the contracted axes, it factors out of the matmul:

    einsum(eq, x, q * s) == einsum(eq, x, q) * s        (s broadcast over the output)

`linear` computes the right-hand side: the weight is converted to the activation dtype (exact:
int8 and e4m3 values are bf16 / f16 / f32 values), contracted with float32 accumulation, then
scaled per output channel. Inside jit XLA fuses the convert into the dot's operand, so on CPU
this is dequantize-then-matmul without a dequantized copy of the weight in memory; on TPU v5e /
v6e XLA keeps the int8 weight in HBM and converts in VMEM (weight-only int8 halves the bytes
each decode step reads, which bounds decode), and on H100 / H200 the same holds for e4m3.
A native low-precision dot (int8 x int8 -> int32 on TPU, e4m3 x e4m3 on GPU through XLA's fp8
gemm) needs the activations quantized too: w8a8, opt-in (EngineConfig.activation_quantization),
quantizes each token's input of every projection dynamically (absmax per token, float32 scale) and
contracts the 8-bit operands (`_w8a8`). Off by default: it adds a rounding of the activations, and
on CPU it is only a check of the numerics (XLA converts the operands back before its dot).

Why not qwix (installed, 0.1.8; MaxText and tpu-inference use it): its PTQ provider intercepts
jnp.einsum / lax.dot_general while the model runs and, the first time an op sees a param, swaps
that nnx.Param attribute of the *current* module for a quantized one. Our decoder's layers are
one nnx.vmap-stacked module that `CausalLM._run_layers` splits and re-merges inside lax.scan, so
a swap made in the scan body never reaches the stacked state (it would leak tracers), and the
loader streams each layer's tensor into its slot of a donated stacked array, where qwix's
quantize_params wants the whole unquantized tree first. Explicit parameters and one function at
each projection are smaller than adapting either side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.models.params import param

QUANTIZATIONS = ("int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}  # float8_e4m3fn's largest finite value is 448
_QDTYPE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}

# The quantized projections of a decoder layer: parameter name -> the axes its matmul contracts
# (of the per-layer weight, without the stacked layers axis). The MLP's weights contract their
# second-to-last axis, which holds for a mixture of experts' stacked [E, ...] ones too
# (`contract_axes`).
QUANTIZED_WEIGHTS: dict[str, tuple[int, ...]] = {
    "q_proj": (0,), "k_proj": (0,), "v_proj": (0,),  # [D, N|K, H], "td,dnh->tnh"
    "o_proj": (0, 1),                                 # [N, H, D], "tnh,nhd->td"
    "gate_proj": (0,), "up_proj": (0,),               # [D, F], "td,df->tf"
    "down_proj": (0,),                                # [F, D], "tf,fd->td"; experts [E, F, D]
    "gate_up_proj": (1,),                             # experts [E, D, 2F] (models.moe)
}
_MLP_WEIGHTS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


def contract_axes(name: str, ndim: int) -> tuple[int, ...]:
    """The contracted axes of projection `name` in a per-layer tensor of `ndim` axes (one expert's
    [D, F] slice of an expert weight contracts axis 0, the whole [E, D, 2F] axis 1)."""
    return (ndim - 2,) if name in _MLP_WEIGHTS else QUANTIZED_WEIGHTS[name]


def check_mode(mode: str) -> None:
    if mode not in _QMAX:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None), got {mode!r}")


def quantized_dtype(mode: str):
    """int8 -> jnp.int8, fp8 -> jnp.float8_e4m3fn."""
    check_mode(mode)
    return _QDTYPE[mode]


def scale_axes(axes: tuple[str | None, ...], contract_axes: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axes of a weight's scale: the weight's, None on the contracted (size-1) axes."""
    return tuple(None if i in contract_axes else a for i, a in enumerate(axes))


@jax.jit(static_argnums=(1, 2))
def quantize(w, contract_axes: tuple[int, ...], mode: str):
    """Symmetric per-output-channel quantization of a weight.

    w: float array, e.g. q_proj [d, n, h]; contract_axes: the axes the matmul sums over (e.g. (0,) for "td,dnh").
    Returns (q, scale): q has w's shape in int8 / float8_e4m3fn; scale is float32 with w's shape and size 1 on
    contract_axes (keepdims), so that w ~= q.astype(float32) * scale.
    """
    check_mode(mode)
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contract_axes, keepdims=True)
    # amax * (1 / qmax), not amax / qmax: XLA rewrites a division by a constant into that product
    # anyway, and this way jit, eager and a numpy oracle agree to the bit.
    scale = jnp.where(amax > 0, amax * np.float32(1.0 / _QMAX[mode]), 1.0).astype(jnp.float32)
    scaled = w32 / scale
    if mode == "int8":
        q = jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8)
    else:
        q = jnp.clip(scaled, -448.0, 448.0).astype(jnp.float8_e4m3fn)
    return q, scale


def linear_weight(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, name: str,
                  quantization: str | None) -> tuple[nnx.Param, nnx.Param | None]:
    """A projection's parameters: (weight, None) unquantized; quantized, (values, scale): the
    values int8 / e4m3 with the weight's axes, the float32 scale [size 1 on the axes that
    QUANTIZED_WEIGHTS[name] contracts] with those axes None. A random weight (N(0, 0.02)) is
    drawn in float32 and quantized, so a quantized model made from scratch is a real one."""
    if quantization is None:
        return param(rngs, shape, axes, dtype), None
    contract = contract_axes(name, len(shape))
    q, scale = quantize(param(rngs, shape, axes, jnp.float32).get_value(), contract, quantization)
    return (nnx.Param(q, out_sharding=axes, eager_sharding=False),
            nnx.Param(scale, out_sharding=scale_axes(axes, contract), eager_sharding=False))


def dequantize(q, scale, dtype=jnp.float32):
    """q * scale in float32, cast to dtype."""
    return (q.astype(jnp.float32) * scale).astype(dtype)


def quantized_einsum(eq: str, x, q, scale):
    """einsum(eq, x, dequantize(q, scale)) computed in float32 and cast back to x.dtype (dequantize-then-matmul)."""
    w = dequantize(q, scale, jnp.float32)
    return jnp.einsum(eq, x.astype(jnp.float32), w).astype(x.dtype)


def _apply_scale(eq: str, y: jax.Array, scale: jax.Array) -> jax.Array:
    """y (the einsum's float32 output) times the weight's per-output-channel scale.

    eq "td,dnh->tnh", scale [1, N, H] -> y * scale[0] broadcast over t. The scale's kept axes
    (those not contracted) are output letters, so one elementwise einsum places them.
    """
    inputs, out = eq.replace(" ", "").split("->")
    rhs = inputs.split(",")[1]
    kept = [i for i, c in enumerate(rhs) if c in out]
    contracted = tuple(i for i in range(len(rhs)) if i not in kept)
    s = jnp.squeeze(scale, axis=contracted) if contracted else scale
    return jnp.einsum(f"{out},{''.join(rhs[i] for i in kept)}->{out}", y, s)


def _quantize_tokens(eq: str, x: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token activation quantization (w8a8): x's absmax over the axes eq contracts, one
    float32 scale per remaining index (per token), -> (int8 / e4m3 values, scale squeezed to x's kept axes)."""
    lhs, out = eq.replace(" ", "").split("->")[0].split(",")[0], eq.split("->")[1].strip()
    contracted = tuple(i for i, c in enumerate(lhs) if c not in out)
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=contracted, keepdims=True)
    scale = jnp.where(amax > 0, amax * np.float32(1.0 / _QMAX[mode]), 1.0)
    scaled = x32 / scale
    if mode == "int8":
        q = jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8)
    else:
        q = jnp.clip(scaled, -448.0, 448.0).astype(jnp.float8_e4m3fn)
    return q, jnp.squeeze(scale, axis=contracted)


def _w8a8(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(eq, x, w) with x quantized per token to w's 8-bit type: int8 x int8 accumulated in
    int32 (exact; XLA's native int8 dot on TPU), e4m3 x e4m3 accumulated in float32 (XLA's fp8 gemm
    on H100 / H200; on CPU XLA converts the operands first). Returns float32 with the activation
    scales applied (the weight's are applied by the caller)."""
    mode = "int8" if w.dtype == jnp.int8 else "fp8"
    xq, xs = _quantize_tokens(eq, x, mode)
    acc = jnp.int32 if mode == "int8" else jnp.float32
    y = jnp.einsum(eq, xq, w, preferred_element_type=acc).astype(jnp.float32)
    inputs, out = eq.replace(" ", "").split("->")
    kept = "".join(c for c in inputs.split(",")[0] if c in out)
    return jnp.einsum(f"{out},{kept}->{out}", y, xs)


def linear(eq: str, x: jax.Array, w, scale=None, *, w8a8: bool = False) -> jax.Array:
    """einsum(eq, x, w) for a projection (eq's second operand is the weight, e.g. "td,dnh->tnh");
    w and scale are arrays or the nnx.Params `linear_weight` makes.

    scale None: w is a float weight, plain einsum in x's dtype. Else w holds int8 / e4m3 values
    and scale their float32 per-output-channel scale (size 1 on the contracted axes): the
    weight-only quantized matmul (module docstring): the dot in x.dtype, scaled in float32, cast back.
    Platform paths: on TPU the convert fuses into the int8-weight dot. With `w8a8` (opt-in,
    EngineConfig.activation_quantization) x is quantized per token too and the dot runs on the
    8-bit operands (`_w8a8`).
    """
    w = w[...]
    if scale is None:
        return jnp.einsum(eq, x, w)
    scale = scale[...]
    if w8a8:  # activations quantized per token too (EngineConfig.activation_quantization)
        y = _w8a8(eq, x, w)
    else:
        # float32 accumulation is XLA's own for a bf16 / f16 dot (TPU's MXU, GPU); asking for an f32
        # result of one is refused by XLA:CPU's DotThunk at some shapes, so only f32 x f32 asks.
        acc = jnp.float32 if x.dtype == jnp.float32 else None
        y = jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=acc).astype(jnp.float32)
    return _apply_scale(eq, y, scale).astype(x.dtype)


def dequantize_numpy(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Independent numpy reference: q * scale in float32."""
    return np.asarray(q).astype(np.float32) * np.asarray(scale, np.float32)
