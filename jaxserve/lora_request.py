"""LoRARequest: which PEFT adapter a request runs with (vLLM's `vllm.lora.request.LoRARequest`).

    llm = LLM(model, enable_lora=True, max_loras=4, max_lora_rank=16)
    llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "/adapters/sql"))

`lora_int_id` identifies the adapter to the engine (its device slot, its prefix-cache key);
`lora_name` is what the OpenAI API calls it (the `model` field); `lora_path` is a local
directory holding adapter_config.json and adapter_model.safetensors (or a hub id when online).
"""

from __future__ import annotations

import dataclasses

# How the engine computes each token's low-rank delta (models.lora_layers.LORA_METHODS).
LORA_DELTA_METHODS = ("onehot", "gather", "ragged")


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name.strip():
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer (0 is the base model), got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must be a non-empty string, got {self.lora_path!r}")

    @property
    def prefix_key(self) -> bytes:
        """The prefix-cache salt of its requests: pages computed under one adapter are never
        another's (or the base model's)."""
        return f"lora:{self.lora_int_id}:{self.lora_name}:{self.lora_path}".encode()
