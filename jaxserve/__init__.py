"""jaxserve: LLM inference and serving in JAX.

    from jaxserve import LLM, SamplingParams
"""

from typing import Any

__all__ = ["AsyncClient", "AsyncLLM", "Client", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "RequestOutput",
           "SamplingParams"]

_EXPORTS = {
    "AsyncClient": "jaxserve.client",
    "AsyncLLM": "jaxserve.async_llm",
    "Client": "jaxserve.client",
    "CompletionOutput": "jaxserve.outputs",
    "EngineConfig": "jaxserve.config",
    "LLM": "jaxserve.llm",
    "LLMEngine": "jaxserve.engine",
    "RequestOutput": "jaxserve.outputs",
    "SamplingParams": "jaxserve.sampling_params",
}


def __getattr__(name: str) -> Any:
    # Lazy: `jaxserve --help` and light imports do not pay for JAX and transformers.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
