"""jaxserve's own checkpoint form: the HF directory's config and tokenizer files, plus the
parameters already in our layout and dtype, saved with Orbax. Loading skips the per-tensor
transposes and reads shards in parallel.

Layout of a converted directory:
    config.json, tokenizer files ...   copied from the HF source
    jaxserve_checkpoint.json            marker: format version and dtype
    orbax/                              Orbax StandardCheckpointer of the parameter tree
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from models.config import ModelLoadError
from models.loader import ORBAX_DIR, ORBAX_MARKER, ShardingFn, load_model, resolve_model_dir

FORMAT_VERSION = 1
COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja")


def convert(src: str, dst: str | Path, *, dtype: str = "auto") -> Path:
    """Converts a HF model (directory or hub id) into a jaxserve Orbax checkpoint at `dst`."""
    dst = Path(dst).expanduser().resolve()
    if dst.exists() and any(dst.iterdir()):
        raise ModelLoadError(f"destination {dst} exists and is not empty")
    loaded = load_model(src, dtype=dtype)
    dst.mkdir(parents=True, exist_ok=True)
    for file in resolve_model_dir(src).iterdir():
        if file.is_file() and file.suffix in COPIED_SUFFIXES and not file.name.endswith(".index.json"):
            shutil.copy2(file, dst / file.name)
    params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst / ORBAX_DIR, params)
    marker = {"format_version": FORMAT_VERSION, "dtype": jax.numpy.dtype(loaded.dtype).name}
    (dst / ORBAX_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return dst


def restore_state(path: Path, abstract_state: nnx.State, sharding_fn: ShardingFn | None) -> nnx.State:
    """Restores parameters into `abstract_state` (shapes and dtypes from the model we build),
    each placed with the sharding of its logical axes."""
    marker = json.loads((path.parent / ORBAX_MARKER).read_text())
    if marker.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path.parent} has checkpoint format {marker.get('format_version')}, "
                             f"this jaxserve reads {FORMAT_VERSION}")
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
    """Orbax stores dict keys as strings; list indices of nnx.List come back as '0', '1', ..."""
    return {str(k): _as_saved(v) if isinstance(v, dict) else v for k, v in tree.items()}
