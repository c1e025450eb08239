"""Quantizing a model's weights at load (EngineConfig.quantization: int8 | fp8).

The loader hands every tensor through `prepare` after transforming it to our layout: a tensor
of a quantized projection (models.quantization.QUANTIZED_WEIGHTS, in a decoder layer; a mixture of
experts' gate_up / down expert weights and its shared expert included) becomes
two, its int8 / e4m3 values and their float32 per-output-channel scale (the `<name>_scale`
parameter beside it), quantized from the checkpoint's values in float32; everything else is cast
to the model dtype as before. An Orbax checkpoint (saved unquantized) is restored unquantized and
quantized on its devices (`quantize_state`). Embeddings, norms, biases and the LM head stay in
the model dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.models.config import ModelConfig
from jaxserve.models.quantization import QUANTIZED_WEIGHTS, contract_axes, quantize

Path = tuple


def is_quantized_path(cfg: ModelConfig, path: Path) -> bool:
    """A decoder layer's projection under cfg.quantization."""
    return cfg.quantization is not None and path[0] == "layers" and path[-1] in QUANTIZED_WEIGHTS


def scale_path(path: Path) -> Path:
    return (*path[:-1], f"{path[-1]}_scale")


def check_supported(cfg: ModelConfig, prequantized: bool = False) -> None:
    """Refuses what quantization does not cover yet: a pre-quantized mixture of experts (its expert
    tensors' scales are not read); quantizing one at load is supported."""
    if prequantized and cfg.num_experts:
        raise ValueError(f"pre-quantized mixture-of-experts checkpoints are not supported yet ({cfg.model_type}, "
                         f"{cfg.num_experts} experts, quantization_config); load the unquantized checkpoint with "
                         f"quantization={cfg.quantization!r} instead")


def prepare(cfg: ModelConfig, path: Path, value: np.ndarray, dtype,
            scale: np.ndarray | None = None) -> list[tuple[Path, jax.Array | np.ndarray]]:
    """One tensor in our layout (one layer's slice for a stacked parameter) -> the (path, value)
    pairs to store: [(path, value cast to dtype)], or for a quantized projection
    [(path, int8 / e4m3 values), (path + "_scale", float32 scale)], quantized on the default device;
    `scale` given (a pre-quantized checkpoint, models.prequantized): value holds the checkpoint's
    8-bit values, stored as they are with that scale."""
    if not is_quantized_path(cfg, path):
        return [(path, value.astype(dtype))]
    if scale is not None:
        return [(path, value), (scale_path(path), scale)]
    q, scale = quantize(np.asarray(value, np.float32), contract_axes(path[-1], value.ndim), cfg.quantization)
    return [(path, q), (scale_path(path), scale)]


def quantize_state(cfg: ModelConfig, plain: nnx.State, target: nnx.State, sharding_fn) -> nnx.State:
    """`target` (the quantized model's abstract state) filled from `plain`, the same model's
    unquantized state (restored from Orbax, layer-stacked): each projection [L, ...] is quantized
    on its devices (contracted axes shifted by the layers axis) into its target shardings."""
    values = {path: var.get_value() for path, var in nnx.to_flat_state(plain)}
    flat = nnx.to_flat_state(target)
    variables = dict(flat)
    for path, var in flat:
        if path[-1].endswith("_scale") and path[-1][:-6] in QUANTIZED_WEIGHTS:
            continue  # filled with its weight
        if not is_quantized_path(cfg, path):
            var.set_value(values[path])
            continue
        # [L, ...]: axis 0 is the layers axis
        contract = tuple(a + 1 for a in contract_axes(path[-1], values[path].ndim - 1))
        shardings = tuple(_sharding(variables[p], sharding_fn) for p in (path, scale_path(path)))
        fn = jax.jit(lambda w, c=contract: quantize(w, c, cfg.quantization),
                     out_shardings=shardings if None not in shardings else None)
        q, scale = fn(values[path])
        var.set_value(q)
        variables[scale_path(path)].set_value(scale)
    return nnx.from_flat_state(flat)


def _sharding(var, sharding_fn):
    axes = var.get_metadata().get("out_sharding")
    return sharding_fn(tuple(axes)) if sharding_fn is not None and axes is not None else None


def param_bytes(state: nnx.State) -> tuple[int, int]:
    """(bytes of every parameter, the most any one device holds): the model's size on its devices."""
    total, per_device = 0, {}
    for _, var in nnx.to_flat_state(state):
        a = var.get_value()
        total += a.size * jnp.dtype(a.dtype).itemsize
        for shard in getattr(a, "addressable_shards", ()):
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return total, max(per_device.values(), default=total)
