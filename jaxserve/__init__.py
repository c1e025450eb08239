"""jaxserve: LLM inference and serving in JAX.

    from jaxserve import LLM, SamplingParams

Layers, each importing only those below it: entrypoints/ -> engine/ -> worker/, core/ ->
jaxserve.models -> jaxserve.kernels. The modules at this level (config, sharding, sampling_params,
outputs, demo_model, protos) are shared value types and settings that every layer reads.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

# The repository's top-level models/ and pallas_kernels/ are installed as jaxserve.models and
# jaxserve.kernels (pyproject's package-dir), so nothing generic lands in site-packages. In a source
# checkout (PYTHONPATH or an editable install) they sit beside this folder: the finder below gives
# them the same names, from this checkout, without importing them before they are asked for.
_SOURCE_FOLDERS = {"jaxserve.models": "models", "jaxserve.kernels": "pallas_kernels"}


class _SourceCheckoutFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path):
        self._folders = {name: root / folder for name, folder in _SOURCE_FOLDERS.items()}

    def find_spec(self, fullname, path=None, target=None):
        folder = self._folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


_here = Path(__file__).resolve().parent
if not (_here / "models").is_dir() and (_here.parent / "models" / "__init__.py").is_file():
    sys.meta_path.insert(0, _SourceCheckoutFinder(_here.parent))

__all__ = ["AsyncClient", "AsyncLLM", "BeamSearchParams", "Client", "CompletionOutput", "EngineConfig", "LLM",
           "LLMEngine", "LoRARequest", "RequestOutput", "SamplingParams", "StructuredOutputsParams"]

_EXPORTS = {
    "AsyncClient": "jaxserve.entrypoints.client",
    "AsyncLLM": "jaxserve.engine.async_llm",
    "BeamSearchParams": "jaxserve.engine.beam_search",
    "Client": "jaxserve.entrypoints.client",
    "CompletionOutput": "jaxserve.outputs",
    "EngineConfig": "jaxserve.config",
    "LLM": "jaxserve.engine.llm",
    "LLMEngine": "jaxserve.engine.llm_engine",
    "LoRARequest": "jaxserve.lora_request",
    "RequestOutput": "jaxserve.outputs",
    "SamplingParams": "jaxserve.sampling_params",
    "StructuredOutputsParams": "jaxserve.sampling_params",
}


def __getattr__(name: str) -> Any:
    # Lazy: `jaxserve --help` and light imports do not pay for JAX and transformers.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
