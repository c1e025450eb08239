"""ModelConfig: the architecture facts our decoder needs, read from a Hugging Face config.

One frozen dataclass covers the Llama family (Llama 2/3/3.x, Mistral, Qwen2, Qwen3, Granite),
Gemma 2 / 3, whose layer structure (sandwich norms, (1 + weight) RMSNorm) is `gemma_norms`, and
the mixtures of experts built on the Llama layer (Mixtral, Qwen2-MoE, Qwen3-MoE: `num_experts` > 0).
`ModelConfig.from_hf(dict)` builds it from the fields that `models.registry` reads out of a HF
config (both the transformers 4 and 5 forms). Architecture differences are flags and
multipliers here, not separate model classes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from jaxserve.models.activations import ACTIVATIONS
from jaxserve.models.errors import ModelConfigError, ModelLoadError
from jaxserve.models.registry import config_fields
from jaxserve.models.rope import RopeConfig

__all__ = ["ModelConfig", "ModelConfigError", "ModelLoadError", "RopeConfig"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only model of the Llama or Gemma family."""

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
    # Tensor parallelism over more devices than kv heads: each kv head is computed and cached
    # this many times (k_proj / v_proj columns copied at load), so every device holds only the
    # one copy its query heads read. 1 otherwise; never read from a HF config (see
    # `for_tensor_parallel`).
    kv_head_replicas: int = 1
    # Gemma 2 / 3 (models.gemma): every RMSNorm scales by (1 + weight) in float32, and each layer
    # normalises attention and MLP outputs too (post_attention, pre/post_feedforward norms).
    gemma_norms: bool = False
    # Soft caps c: x -> c * tanh(x / c), on attention logits (after sm_scale) and on the LM logits.
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # RoPE of the sliding-window layers when it differs from `rope` (Gemma 3's local layers:
    # rope_local_base_freq, or transformers 5 rope_parameters["sliding_attention"]); None: `rope`.
    sliding_rope: RopeConfig | None = None
    # Mixture of experts (models.moe; Mixtral, Qwen3-MoE, Qwen2-MoE): every layer's MLP is a block
    # of num_experts experts of width moe_intermediate_size, num_experts_per_tok of them per token.
    # 0 experts: the dense MLP of width intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    router_weights_in_model_dtype: bool = False  # Qwen casts the top-k weights; Mixtral keeps float32
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0: none
    # Expert parallelism: the experts are split over this many devices of the model axis, whole
    # experts per device (jaxserve.sharding.Placement.expert_parallel); never read from a HF config.
    expert_parallel: int = 1
    # Weight quantization of the decoder layers' projections (models.quantization): None, "int8" or
    # "fp8" (e4m3); per-output-channel scales beside the weights. Set by the loader (the engine's
    # `quantization`), never read from a HF config's fields.
    quantization: str | None = None
    # w8a8 (opt-in): also quantize each projection's input per token (models.quantization.linear).
    activation_quantization: bool = False

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
        if not isinstance(self.kv_head_replicas, int) or self.kv_head_replicas < 1 \
                or self.num_heads % self.cache_kv_heads:
            raise ModelConfigError(f"kv_head_replicas must be a positive integer with {self.num_kv_heads} kv heads x "
                                   f"replicas dividing {self.num_heads} query heads, got {self.kv_head_replicas!r}")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.sliding_windows) != self.num_layers:
            raise ModelConfigError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers"
            )
        self.rope.rotary_dim(self.head_dim)  # partial rotary and longrope factor lengths fit the head
        if self.hidden_act not in ACTIVATIONS:
            raise ModelConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: "
                                   f"{', '.join(ACTIVATIONS)}")
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value) or value <= 0):
                raise ModelConfigError(f"{name} must be None or a positive number, got {value!r}")
        if self.sliding_rope is not None and not isinstance(self.sliding_rope, RopeConfig):
            raise ModelConfigError(f"sliding_rope must be None or a RopeConfig, got {self.sliding_rope!r}")
        if self.sliding_rope is not None and all(w is None for w in self.sliding_windows):
            raise ModelConfigError("sliding_rope is set but no layer has a sliding window")
        if self.sliding_rope is not None:
            self.sliding_rope.rotary_dim(self.head_dim)
        self._check_experts()
        if self.quantization is not None and self.quantization not in ("int8", "fp8"):
            raise ModelConfigError(f"quantization must be None, 'int8' or 'fp8', got {self.quantization!r}")
        if self.activation_quantization and self.quantization is None:
            raise ModelConfigError("activation_quantization (w8a8) needs quantized weights: set quantization to "
                                   "'int8' or 'fp8' (or load a pre-quantized checkpoint)")

    def _check_experts(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ModelConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.expert_parallel, int) or self.expert_parallel < 1:
            raise ModelConfigError(f"expert_parallel must be a positive integer, got {self.expert_parallel!r}")
        if not self.num_experts:
            if self.num_experts_per_tok or self.moe_intermediate_size or self.shared_expert_intermediate_size \
                    or self.expert_parallel != 1:
                raise ModelConfigError("num_experts_per_tok, moe_intermediate_size, shared_expert_intermediate_size "
                                       "and expert_parallel need num_experts > 0")
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ModelConfigError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                   f"got {self.num_experts_per_tok}")
        if self.moe_intermediate_size < 1:
            raise ModelConfigError(f"moe_intermediate_size must be a positive integer, got {self.moe_intermediate_size}")
        if self.num_experts % self.expert_parallel:
            raise ModelConfigError(f"expert_parallel ({self.expert_parallel}) must divide num_experts "
                                   f"({self.num_experts}): whole experts per device")
        if self.mlp_bias:
            raise ModelConfigError("mlp_bias is not supported with experts")

    @property
    def sm_scale(self) -> float:
        """Softmax scale of attention logits."""
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def cache_kv_heads(self) -> int:
        """The kv heads the model computes and the KV cache stores: num_kv_heads x kv_head_replicas.
        Query head i reads cache head i // (num_heads // cache_kv_heads), a copy of the model's
        kv head i // (num_heads // num_kv_heads)."""
        return self.num_kv_heads * self.kv_head_replicas

    def for_tensor_parallel(self, size: int) -> "ModelConfig":
        """This config with kv heads replicated to cover `size` tensor-parallel devices."""
        return dataclasses.replace(self, kv_head_replicas=kv_head_replicas(self.num_kv_heads, size))

    @property
    def num_params(self) -> int:
        d, v = self.hidden_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = (attn + self._mlp_params(active=False) + (4 if self.gemma_norms else 2) * d
                     + 2 * self.qk_norm * self.head_dim)
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head

    @property
    def num_active_params(self) -> int:
        """Parameters one token's forward pass reads: num_params less the experts it is not routed to."""
        return self.num_params - self.num_layers * (self._mlp_params(active=False) - self._mlp_params(active=True))

    def _mlp_params(self, active: bool) -> int:
        """One layer's MLP parameters: dense, or router + experts (only the k routed when active) + shared."""
        d = self.hidden_size
        if not self.num_experts:
            return 3 * d * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        shared = 3 * d * self.shared_expert_intermediate_size + d if self.shared_expert_intermediate_size else 0
        return d * self.num_experts + experts * 3 * d * self.moe_intermediate_size + shared

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Builds the config from a parsed HF `config.json`, for any registered model type."""
        return cls(**config_fields(hf))


def kv_head_replicas(num_kv_heads: int, tensor_parallel_size: int) -> int:
    """How many copies of each kv head split `num_kv_heads` evenly over the devices, one or more
    whole heads per device (as vLLM does): tp // kv when kv < tp, else 1. Refuses sizes where
    neither divides the other, since then some device would need part of a head."""
    kv, tp = num_kv_heads, tensor_parallel_size
    if kv % tp and tp % kv:
        raise ValueError(f"tensor parallel size {tp} with {kv} kv heads: the tensor parallel size must divide the "
                         f"kv heads or be a multiple of them (e.g. {', '.join(map(str, _near_sizes(kv, tp)))})")
    return max(1, tp // kv)


def _near_sizes(kv: int, tp: int) -> list[int]:
    """Valid tensor-parallel sizes around tp for kv heads: divisors of kv, then multiples."""
    sizes = [m for m in range(1, kv + 1) if kv % m == 0] + [kv * m for m in range(2, 2 + max(2, tp // kv))]
    return sorted(sizes, key=lambda m: (abs(m - tp), m))[:3]
