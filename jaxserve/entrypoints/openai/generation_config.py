"""--generation-config (vLLM's): default sampling values from the model's generation_config.json.

    "auto"   the model directory's generation_config.json (vLLM's default)
    "vllm"   none: jaxserve's own defaults (also "none")
    DIR      that directory's generation_config.json

A request's own values always win; the defaults fill only the fields it leaves unset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# generation_config.json key -> SamplingParams field (vLLM's get_diff_sampling_param)
KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def model_dir_of(engine: Any) -> str | None:
    inner = getattr(engine, "engine", engine)
    return getattr(inner, "model_dir", None) or getattr(getattr(engine, "tokenizer", None), "name_or_path", None)


def load_generation_defaults(source: str | None, model_dir: str | None) -> dict[str, Any]:
    """The sampling defaults named by `source` (see the module doc); {} when there are none."""
    if source is None or source in ("vllm", "none"):
        return {}
    folder = model_dir if source == "auto" else source
    if source != "auto" and not Path(source).is_dir():
        raise ValueError(f"generation_config {source!r} is not 'auto', 'vllm' or a directory")
    if folder is None:
        return {}
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        if source != "auto":
            raise ValueError(f"generation_config: {path} does not exist")
        return {}
    data = json.loads(path.read_text())
    return {field: data[key] for key, field in KEYS.items() if data.get(key) is not None}
