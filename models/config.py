"""ModelConfig: the architecture facts our decoder needs, read from a Hugging Face config.

One frozen dataclass covers the Llama family (Llama 2/3/3.x, Mistral, Qwen2, Qwen3, Granite).
`ModelConfig.from_hf(dict)` reads both the transformers 4 form (`torch_dtype`, top-level
`rope_theta`, `rope_scaling`) and the transformers 5 form (`dtype`, nested `rope_parameters`).
Architecture differences are flags and multipliers here, not separate model classes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ModelLoadError(ValueError):
    """A model we cannot load (missing files, bad tensors, unknown model), with the reason."""


class ModelConfigError(ModelLoadError):
    """A model config we cannot use, with the reason in the message."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.theta <= 0:
            raise ModelConfigError(f"rope_theta must be > 0, got {self.theta}")
        if self.factor <= 0:
            raise ModelConfigError(f"rope factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only model of the Llama family."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama with attention_bias)
    o_proj_bias: bool = False  # Llama's attention_bias also adds an o_proj bias; Qwen2's does not
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    # Per layer: sliding window size, or None for full attention (Mistral, Qwen2/3 with windows).
    sliding_windows: tuple[int | None, ...] = ()
    # Granite multipliers (1.0 elsewhere); attention_multiplier replaces 1/sqrt(head_dim) when set.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None  # dtype the checkpoint was saved in, for information

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.sliding_windows) != self.num_layers:
            raise ModelConfigError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ModelConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: silu")

    @property
    def sm_scale(self) -> float:
        """Softmax scale of attention logits."""
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def num_params(self) -> int:
        d, m, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * m + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Builds the config from a parsed HF `config.json`, for any registered model type."""
        from models.registry import adapter_for  # local import: registry imports this module

        return adapter_for(hf)(hf)


def read_rope(hf: Mapping[str, Any]) -> RopeConfig:
    """Reads RoPE settings from transformers 5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params and isinstance(params["full_attention"], Mapping):
        params = dict(params["full_attention"])  # per-layer-type form; all our models share one
    legacy = dict(hf.get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    kwargs: dict[str, Any] = {"theta": float(theta), "rope_type": str(rope_type)}
    if rope_type == "dynamic":
        raise ModelConfigError(
            "rope type 'dynamic' (dynamic NTK) changes with sequence length and is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type != "default":
        kwargs["factor"] = float(merged.get("factor", 1.0) or 1.0)
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
        if merged.get(key) is not None:
            kwargs[key] = float(merged[key])
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if merged.get(key) is not None:
            kwargs[key] = float(merged[key])
    if merged.get("original_max_position_embeddings") is not None:
        kwargs["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    if merged.get("truncate") is not None:
        kwargs["truncate"] = bool(merged["truncate"])
    return RopeConfig(**kwargs)


def eos_ids(hf: Mapping[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def checkpoint_dtype(hf: Mapping[str, Any]) -> str | None:
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    return None if dtype is None else str(dtype).removeprefix("torch.")
