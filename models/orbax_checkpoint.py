"""HF -> jaxserve Orbax checkpoint conversion (`jaxserve convert`): load the HF model in the
requested dtype, copy its config and tokenizer files, save the parameters with Orbax (see
`models.orbax_state` for the layout). Loading the result skips the per-tensor transposes and
reads shards in parallel.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flax import nnx

from jaxserve.models.errors import ModelLoadError
from jaxserve.models.loader import load_model
from jaxserve.models.model_files import resolve_model_dir
from jaxserve.models.orbax_state import save_params

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
    save_params(dst, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)), loaded.dtype)
    return dst
