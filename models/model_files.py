"""Where a model's files are: a local HF directory or a hub id, its config.json, and the marker
that makes a directory a jaxserve Orbax checkpoint. Shared by the loader and the Orbax code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax

from jaxserve.models.errors import ModelLoadError

# Maps a parameter's logical axis names to where it should live (None: default device).
ShardingFn = Callable[[tuple[str | None, ...]], "jax.sharding.Sharding | None"]

ORBAX_DIR = "orbax"  # the Orbax StandardCheckpointer directory inside a converted model
ORBAX_MARKER = "jaxserve_checkpoint.json"  # format version and dtype of a converted model
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "tokenizer*"]


def is_orbax_checkpoint(model_dir: Path) -> bool:
    return (model_dir / ORBAX_MARKER).is_file()


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id downloaded through huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model {str(model)!r} is a file; expected a model directory or a hub id")
    name = str(model)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {name!r} is not a local directory and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download  # slow to import; only hub ids need it

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo: say which and why
        raise ModelLoadError(
            f"model {name!r} is not a local directory and could not be downloaded from the hub: "
            f"{type(e).__name__}: {e}"
        ) from None


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
