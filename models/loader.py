"""Loading models: a local HF directory, a hub id, or a jaxserve Orbax checkpoint.

Flow: resolve the directory (download through huggingface_hub when given a hub id) ->
read config.json -> ModelConfig -> an abstract CausalLM (shapes only, no memory) ->
stream tensors one at a time from *.safetensors (sharded index supported), check each
shape, transform to our layout, cast to the requested dtype, place with the sharding for
its logical axes -> merge into a real model. A decoder layer's tensor goes into index i of
its layer-stacked parameter, which is allocated once on its devices and updated in place
(donated), so nothing is materialised twice and the host holds one tensor at a time.

Tensor parallelism over more devices than kv heads (`kv_head_replicas` r > 1): every
parameter with a `kv_heads` axis (k_proj, v_proj, their biases) has each head's slice
repeated r times along it (head j of the model is head j // r of the checkpoint), on the host
for safetensors, on the devices after an Orbax restore.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.models.config import ModelConfig, ModelLoadError
from jaxserve.models.decoder import CausalLM
from jaxserve.models.hf_weights import IGNORED_SUFFIXES, split_fused, text_model_name, weight_specs
from jaxserve.models.model_files import ORBAX_DIR, ShardingFn, is_orbax_checkpoint, read_hf_config, resolve_model_dir
from jaxserve.models.orbax_state import restore_state
from jaxserve.models import prequantized, quantize_weights

__all__ = ["DTYPES", "LoadedModel", "ShardingFn", "load_model", "read_hf_config", "resolve_dtype",
           "resolve_model_dir"]

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    model_dir: Path  # where config.json and the tokenizer files are
    dtype: Any


def resolve_dtype(name: str, cfg: ModelConfig | None = None):
    """'float32' | 'bfloat16' | 'float16' | 'auto' (checkpoint dtype; float32 if unknown)."""
    if name == "auto":
        name = cfg.checkpoint_dtype if cfg and cfg.checkpoint_dtype in DTYPES else "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join([*DTYPES, 'auto'])}, got {name!r}")
    return DTYPES[name]


def load_model(
    model: str | os.PathLike,
    *,
    dtype: str = "float32",
    attention_backend: str = "auto",
    sharding_fn: ShardingFn | None = None,
    mesh=None,
    kv_head_replicas: int = 1,
    expert_parallel: int = 1,
    quantization: str | None = None,
    activation_quantization: bool = False,
) -> LoadedModel:
    """Loads weights from a HF directory / hub id, or a jaxserve Orbax checkpoint directory.
    With `sharding_fn`, each tensor goes straight to its shards; `mesh` tells the model how to
    run a Pallas attention kernel on it; `kv_head_replicas` copies each kv head that many times
    (jaxserve.sharding.Placement.kv_head_replicas; the returned config carries it);
    `expert_parallel` splits a mixture of experts' experts over that many devices of `mesh`
    (Placement.expert_parallel); `quantization` ("int8" | "fp8") quantizes the decoder layers'
    projections per output channel (models.quantize_weights); `activation_quantization` (w8a8)
    quantizes their inputs per token too."""
    model_dir = resolve_model_dir(model)
    hf_config = read_hf_config(model_dir)
    scheme = prequantized.read_scheme(hf_config)  # a pre-quantized checkpoint's quantization_config
    if scheme is not None:
        if quantization not in (None, scheme.mode):
            raise ValueError(f"quantization={quantization!r}, but {model_dir} is a pre-quantized checkpoint "
                             f"({scheme.describe()}): leave quantization unset or set it to {scheme.mode!r}")
        quantization = scheme.mode
    cfg = dataclasses.replace(ModelConfig.from_hf(hf_config), kv_head_replicas=kv_head_replicas,
                              expert_parallel=expert_parallel, quantization=quantization,
                              activation_quantization=activation_quantization)
    quantize_weights.check_supported(cfg, prequantized=scheme is not None)
    jdtype = resolve_dtype(dtype, cfg)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=jdtype, attention_backend=attention_backend, mesh=mesh))
    graphdef, state = nnx.split(abstract)
    if is_orbax_checkpoint(model_dir) and quantization is not None:  # saved unquantized: restore, then quantize
        plain_cfg = dataclasses.replace(cfg, quantization=None, activation_quantization=False)
        _, plain = nnx.split(nnx.eval_shape(lambda: CausalLM(plain_cfg, dtype=jdtype)))
        plain = _restore_orbax(model_dir, plain_cfg, plain, jdtype, sharding_fn)
        state = quantize_weights.quantize_state(cfg, plain, state, sharding_fn)
    elif is_orbax_checkpoint(model_dir):
        state = _restore_orbax(model_dir, cfg, state, jdtype, sharding_fn)
    else:
        state = _fill_from_safetensors(model_dir, cfg, state, jdtype, sharding_fn, scheme)
    return LoadedModel(nnx.merge(graphdef, state), cfg, model_dir, jdtype)


def place(array: np.ndarray, axes: tuple[str | None, ...] | None, sharding_fn: ShardingFn | None) -> jax.Array:
    sharding = sharding_fn(tuple(axes)) if sharding_fn is not None and axes is not None else None
    return jax.device_put(array, sharding) if sharding is not None else jnp.asarray(array)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} lists shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir} has no *.safetensors weights (PyTorch .bin checkpoints are not supported)"
        )
    return files


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """Yields (name, loader) for every tensor, one file open at a time; loader() reads it."""
    from safetensors import safe_open

    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                yield name, (lambda f=f, name=name, file=file: _read_tensor(f, file, name))


def _read_tensor(f, file: Path, name: str) -> np.ndarray:
    if f.get_slice(name).get_dtype().startswith("F8"):  # safetensors' numpy reader has no float8
        return prequantized.read_safetensors_raw(file, name)
    return f.get_tensor(name)


def _fill_from_safetensors(model_dir: Path, cfg: ModelConfig, state: nnx.State, dtype, sharding_fn,
                           scheme: prequantized.Scheme | None = None) -> nnx.State:
    specs = weight_specs(cfg)
    scales: dict[str, np.ndarray] = {}
    tensors = iter_tensors(model_dir)
    if scheme is not None and scheme.strategy == "int4":  # packed 4-bit: group scales and zeros first
        tensors = prequantized.unpack_int4(scheme, tensors, prequantized.collect_int4_aux(iter_tensors(model_dir)))
        prequantized.log_scheme(scheme, 0)
    elif scheme is not None:  # a pre-quantized checkpoint: its weight scales first (small), by weight name
        scales, unused = prequantized.collect_scales(
            (text_model_name(cfg, n) or n, read) for n, read in iter_tensors(model_dir))
        prequantized.log_scheme(scheme, unused)
    flat = nnx.to_flat_state(state)
    variables = dict(flat)
    stacked: dict[tuple, jax.Array] = {}  # path -> the [L, ...] parameter being filled layer by layer
    loaded: set[str] = set()
    unexpected: list[str] = []
    skipped = 0  # tensors of a wrapper's non-text part (Gemma 3's vision tower)
    for name, read in split_fused(cfg, tensors):  # Phi-3's qkv / gate_up split into parts
        name = text_model_name(cfg, name)
        if name is None:
            skipped += 1
            continue
        if scheme is not None and prequantized.is_aux(name):
            continue  # read with its weight (scales) or not used
        spec = specs.get(name)
        if spec is None:
            if not name.endswith(IGNORED_SUFFIXES) and not (cfg.tie_word_embeddings and name == "lm_head.weight"):
                unexpected.append(name)
            continue
        tensor = read()
        if tuple(tensor.shape) != spec.hf_shape:
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {spec.hf_shape} "
                f"from config.json ({cfg.model_type})"
            )
        # A pre-quantized checkpoint's weight: its 8-bit values and its scale in our layout (None:
        # a float weight, quantized at load if it is a projection).
        tensor, scale = prequantized.checkpoint_weight(scheme, name, tensor, scales, spec.transform, spec.path[-1])
        axes = variables[spec.path].get_metadata().get("out_sharding")
        value = spec.transform(tensor)
        if cfg.kv_head_replicas > 1 and axes is not None and "kv_heads" in axes:
            axis = axes.index("kv_heads") - (spec.layer is not None)  # the tensor has no layers axis
            value = np.repeat(value, cfg.kv_head_replicas, axis=axis)
            scale = None if scale is None else np.repeat(scale, cfg.kv_head_replicas, axis=axis)
        for path, part in quantize_weights.prepare(cfg, spec.path, value, dtype, scale):  # cast, or values + scale
            _store(variables[path], path, part, spec, stacked, sharding_fn)
        loaded.add(name)
        loaded.update(spec.covers)
    missing = sorted(n for n, spec in specs.items() if not spec.covers and n not in loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint in {model_dir} is missing tensors: {', '.join(missing[:5])}{more}")
    if skipped:
        log.info("skipped %d tensors outside the text model (%s serves text only)", skipped, cfg.model_type)
    if unexpected:
        log.warning("ignored %d tensors the model does not use: %s", len(unexpected), ", ".join(unexpected[:5]))
    for path, value in stacked.items():
        variables[path].set_value(value)
    return nnx.from_flat_state(flat)


def _store(var, path: tuple, part, spec, stacked: dict[tuple, jax.Array], sharding_fn) -> None:
    """One tensor into its parameter: placed whole, or into layer spec.layer (and block spec.offset)
    of its stacked [L, ...] parameter, allocated on its devices on first use."""
    axes = var.get_metadata().get("out_sharding")
    if spec.layer is None:
        var.set_value(place(part, axes, sharding_fn))
        return
    if path not in stacked:
        stacked[path] = _zeros(var.get_value(), part.dtype, axes, sharding_fn)
    layer = place(part, None if axes is None else axes[len(axes) - part.ndim:], sharding_fn)
    stacked[path] = _set_layer(stacked[path], layer, (spec.layer, *spec.offset))


def _restore_orbax(model_dir: Path, cfg: ModelConfig, state: nnx.State, dtype, sharding_fn) -> nnx.State:
    """Restores a checkpoint (saved with the model's own kv heads); with kv_head_replicas > 1,
    restores into the unreplicated shapes (kv-head axes unsplit) and copies the heads on the
    devices into their final shards."""
    if cfg.kv_head_replicas == 1:
        return restore_state(model_dir / ORBAX_DIR, state, sharding_fn)
    base = dataclasses.replace(cfg, kv_head_replicas=1, expert_parallel=1)  # the same shapes, one device
    _, saved = nnx.split(nnx.eval_shape(lambda: CausalLM(base, dtype=dtype)))
    unsplit = None if sharding_fn is None else (
        lambda axes: sharding_fn(tuple(None if a == "kv_heads" else a for a in axes)))
    saved = dict(nnx.to_flat_state(restore_state(model_dir / ORBAX_DIR, saved, unsplit)))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        axes = var.get_metadata().get("out_sharding")
        value = saved[path].get_value()
        if axes is not None and "kv_heads" in axes:
            sharding = sharding_fn(tuple(axes)) if sharding_fn is not None else None
            value = jax.jit(functools.partial(jnp.repeat, repeats=cfg.kv_head_replicas, axis=axes.index("kv_heads")),
                            out_shardings=sharding)(value)
        var.set_value(value)
    return nnx.from_flat_state(flat)


def _zeros(abstract, dtype, axes, sharding_fn: ShardingFn | None) -> jax.Array:
    sharding = sharding_fn(tuple(axes)) if sharding_fn is not None and axes is not None else None
    return jnp.zeros(abstract.shape, dtype, device=sharding)


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_layer(stacked: jax.Array, value: jax.Array, index: tuple[int, ...]) -> jax.Array:
    """stacked[layer] = value for index (layer,), in place (stacked is donated); with index
    (layer, *offset), the block of stacked[layer] starting at offset (value's missing leading
    axes are size 1: one expert of an [L, E, ...] parameter)."""
    value = value.reshape((1,) * (stacked.ndim - value.ndim) + value.shape)
    return jax.lax.dynamic_update_slice(stacked, value, tuple(index) + (0,) * (stacked.ndim - len(index)))
