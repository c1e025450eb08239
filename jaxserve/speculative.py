"""SpeculativeConfig: vLLM's `speculative_config` shape, frozen and validated on construction.

    LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "prompt_lookup_min": 2, "prompt_lookup_max": 5})
    jaxserve serve MODEL --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'

method "ngram": prompt lookup on the host (the last n tokens, prompt_lookup_max >= n >= prompt_lookup_min,
are searched for earlier in the sequence; the k tokens after the latest match are proposed).
method "draft_model": a small model (`model`, with its own `dtype`) with the target's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

SPEC_METHODS = ("ngram", "draft_model")
DRAFT_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # k: proposed tokens verified per sequence and step
    prompt_lookup_min: int = 1  # ngram: shortest suffix matched
    prompt_lookup_max: int = 3  # ngram: longest suffix matched (tried first)
    model: str | None = None  # draft_model: HF dir / checkpoint of the draft
    dtype: str = "auto"  # draft_model: the draft's own weights dtype

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(SPEC_METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"speculative_config.{name} must be a positive integer, got {v!r}")
        if self.num_speculative_tokens > 16:
            raise ValueError(f"speculative_config.num_speculative_tokens must be <= 16, got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if self.dtype not in DRAFT_DTYPES:
            raise ValueError(f"speculative_config.dtype must be one of {', '.join(DRAFT_DTYPES)}, got {self.dtype!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model (the draft model's path) is required with method 'draft_model'")
        if self.method == "ngram" and self.model is not None:
            raise ValueError("speculative_config.model is only for method 'draft_model'")

    @classmethod
    def coerce(cls, value: Any) -> "SpeculativeConfig | None":
        """None, a SpeculativeConfig, a mapping or a JSON object string (the CLI's form)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config must be a JSON object, got {value!r}: {e}") from None
        if not isinstance(value, Mapping):
            raise ValueError(f"speculative_config must be a mapping, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**dict(value))
