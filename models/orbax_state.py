"""Parameters saved and restored with Orbax, in our layout and dtype (jaxserve's own
checkpoint form; `models.orbax_checkpoint.convert` writes one from a HF model).

Layout of a converted directory:
    config.json, tokenizer files ...   copied from the HF source
    jaxserve_checkpoint.json            marker: format version and dtype
    orbax/                              Orbax StandardCheckpointer of the parameter tree
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxserve.models.errors import ModelLoadError
from jaxserve.models.model_files import ORBAX_DIR, ORBAX_MARKER, ShardingFn

# 2: decoder layer parameters stacked on a leading layers axis (1: one subtree per layer).
FORMAT_VERSION = 2


def save_params(model_dir: Path, params: dict[str, Any], dtype) -> None:
    """Writes `params` (nnx.to_pure_dict of the model's Params) and the marker into model_dir."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(model_dir / ORBAX_DIR, params)
    marker = {"format_version": FORMAT_VERSION, "dtype": jax.numpy.dtype(dtype).name}
    (model_dir / ORBAX_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def restore_state(path: Path, abstract_state: nnx.State, sharding_fn: ShardingFn | None) -> nnx.State:
    """Restores parameters into `abstract_state` (shapes and dtypes from the model we build),
    each placed with the sharding of its logical axes."""
    marker = json.loads((path.parent / ORBAX_MARKER).read_text())
    if marker.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path.parent} has checkpoint format {marker.get('format_version')}, "
                             f"this jaxserve reads {FORMAT_VERSION}; convert the HF model again (jaxserve convert)")
    flat = nnx.to_flat_state(abstract_state)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target: dict = {}
    for keys, var in flat:
        axes = var.get_metadata().get("out_sharding")
        sharding = (sharding_fn(tuple(axes)) if sharding_fn and axes is not None else None) or default
        value = var.get_value()
        node = target
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(path.resolve(), _as_saved(target))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"Orbax checkpoint {path} does not match config.json: {e}") from None
    for keys, var in flat:
        node = restored
        for k in keys:
            node = node[str(k)] if str(k) in node else node[k]
        var.set_value(node)
    return nnx.from_flat_state(flat)


def _as_saved(tree: dict) -> dict:
    """Orbax stores dict keys as strings (an integer key would come back as '0', '1', ...)."""
    return {str(k): _as_saved(v) if isinstance(v, dict) else v for k, v in tree.items()}
