"""jaxserve: LLM inference and serving in JAX.

    from jaxserve import LLM, SamplingParams

Layers, each importing only those below it: entrypoints/ -> engine/ -> worker/, core/ ->
models -> pallas_kernels. The modules at this level (config, sharding, sampling_params,
outputs, demo_model, protos) are shared value types and settings that every layer reads.
"""

from typing import Any

__all__ = ["AsyncClient", "AsyncLLM", "Client", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "RequestOutput",
           "SamplingParams"]

_EXPORTS = {
    "AsyncClient": "jaxserve.entrypoints.client",
    "AsyncLLM": "jaxserve.engine.async_llm",
    "Client": "jaxserve.entrypoints.client",
    "CompletionOutput": "jaxserve.outputs",
    "EngineConfig": "jaxserve.config",
    "LLM": "jaxserve.engine.llm",
    "LLMEngine": "jaxserve.engine.llm_engine",
    "RequestOutput": "jaxserve.outputs",
    "SamplingParams": "jaxserve.sampling_params",
}


def __getattr__(name: str) -> Any:
    # Lazy: `jaxserve --help` and light imports do not pay for JAX and transformers.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
