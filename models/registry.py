"""Registry of supported architectures, keyed by HF `model_type` and `architectures`.

Every supported model runs on the one shared decoder (`models.decoder.CausalLM`); an adapter
turns its HF config into the keyword arguments of a `ModelConfig` with the right flags
(`ModelConfig.from_hf` builds and validates it). Both config forms are read: transformers 4
(`torch_dtype`, top-level `rope_theta`, `rope_scaling`) and transformers 5 (`dtype`, nested
`rope_parameters`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from models.errors import ModelConfigError
from models.rope import SUPPORTED_ROPE_TYPES, RopeConfig

# HF config.json -> keyword arguments of ModelConfig.
Adapter = Callable[[Mapping[str, Any]], dict[str, Any]]


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


def _common(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ModelConfigError(f"config.json of model_type {model_type!r} has no {key!r}")
        return hf[key]

    num_heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    head_dim = hf.get("head_dim") or hidden // num_heads
    num_layers = int(need("num_hidden_layers"))
    return dict(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=read_rope(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_act=str(hf.get("hidden_act", "silu")),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
        checkpoint_dtype=checkpoint_dtype(hf),
        sliding_windows=(None,) * num_layers,
    )


def _layer_windows(hf: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows from `layer_types` (transformers 5) or the Qwen2 rule."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers:
            raise ModelConfigError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        return tuple(int(window) if t == "sliding_attention" and window else None for t in layer_types)
    if not hf.get("use_sliding_window") or not window:
        return (None,) * num_layers
    first = int(hf.get("max_window_layers", num_layers))
    return tuple(int(window) if i >= first else None for i in range(num_layers))


def llama(hf: Mapping[str, Any]) -> dict[str, Any]:
    kw = _common(hf, "llama")
    bias = bool(hf.get("attention_bias", False))
    return dict(kw, attention_bias=bias, o_proj_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def mistral(hf: Mapping[str, Any]) -> dict[str, Any]:
    kw = _common(hf, "mistral")
    window = hf.get("sliding_window")
    kw["sliding_windows"] = (int(window) if window else None,) * kw["num_layers"]
    return kw


def qwen2(hf: Mapping[str, Any]) -> dict[str, Any]:
    kw = _common(hf, "qwen2")
    kw["sliding_windows"] = _layer_windows(hf, kw["num_layers"])
    return dict(kw, attention_bias=True, o_proj_bias=False)


def qwen3(hf: Mapping[str, Any]) -> dict[str, Any]:
    kw = _common(hf, "qwen3")
    kw["sliding_windows"] = _layer_windows(hf, kw["num_layers"])
    bias = bool(hf.get("attention_bias", False))
    return dict(kw, attention_bias=bias, o_proj_bias=bias, qk_norm=True)


def granite(hf: Mapping[str, Any]) -> dict[str, Any]:
    kw = _common(hf, "granite")
    bias = bool(hf.get("attention_bias", False))
    return dict(
        kw,
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
    )


# Mixtures of experts (models.moe). Keys a config.json leaves out take transformers' defaults.
def _experts(hf: Mapping[str, Any], model_type: str, num_experts_keys: tuple[str, ...],
             defaults: Mapping[str, Any]) -> dict:
    """The expert fields of ModelConfig; the expert count from the first of num_experts_keys
    present (transformers 5 saves Qwen3-MoE's num_experts as num_local_experts). Refuses mixed
    dense / sparse layers (Qwen's decoder_sparse_step > 1 or mlp_only_layers), naming the key:
    every layer must be sparse."""
    get = lambda key: hf[key] if hf.get(key) is not None else defaults[key]  # noqa: E731
    num_layers = int(hf["num_hidden_layers"])
    if "decoder_sparse_step" in defaults and int(get("decoder_sparse_step")) != 1:
        raise ModelConfigError(f"decoder_sparse_step {get('decoder_sparse_step')} of model_type {model_type!r} "
                               "mixes dense and sparse layers, which is not supported; supported: 1 (every layer sparse)")
    if "mlp_only_layers" in defaults and [i for i in get("mlp_only_layers") if 0 <= int(i) < num_layers]:
        raise ModelConfigError(f"mlp_only_layers {list(get('mlp_only_layers'))} of model_type {model_type!r} "
                               "mixes dense and sparse layers, which is not supported; supported: []")
    key = next((k for k in num_experts_keys if hf.get(k) is not None), num_experts_keys[0])
    num_experts = int(hf[key] if hf.get(key) is not None else defaults[key])
    if num_experts < 1:
        raise ModelConfigError(f"{key} of model_type {model_type!r} must be positive, got {num_experts}")
    return dict(num_experts=num_experts, num_experts_per_tok=int(get("num_experts_per_tok")),
                moe_intermediate_size=int(get("moe_intermediate_size")),
                norm_topk_prob=bool(get("norm_topk_prob")))


MIXTRAL_DEFAULTS = dict(num_local_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
QWEN3_MOE_DEFAULTS = dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False,
                          decoder_sparse_step=1, mlp_only_layers=[])
QWEN2_MOE_DEFAULTS = dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408, norm_topk_prob=False,
                          decoder_sparse_step=1, mlp_only_layers=[], shared_expert_intermediate_size=5632,
                          qkv_bias=True, max_window_layers=28)


def mixtral(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Mixtral: Mistral attention; softmax, top-k, renormalised (always), float32 weights."""
    kw = mistral(hf)
    # Mixtral's experts are as wide as its intermediate_size; norm_topk_prob is not a Mixtral key.
    experts = _experts({**hf, "moe_intermediate_size": hf.get("intermediate_size"), "norm_topk_prob": True},
                       "mixtral", ("num_local_experts", "num_experts"), MIXTRAL_DEFAULTS)
    return dict(kw, model_type="mixtral", **experts)


def qwen3_moe(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE: Qwen3 attention (q/k norms); one window for every layer when use_sliding_window."""
    kw = _common(hf, "qwen3_moe")
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    kw["sliding_windows"] = (int(window) if window else None,) * kw["num_layers"]
    bias = bool(hf.get("attention_bias", False))
    return dict(kw, attention_bias=bias, o_proj_bias=bias, qk_norm=True, router_weights_in_model_dtype=True,
                **_experts(hf, "qwen3_moe", ("num_experts", "num_local_experts"), QWEN3_MOE_DEFAULTS))


def qwen2_moe(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen2-MoE: Qwen2 attention (q/k/v biases when qkv_bias), a sigmoid-gated shared expert."""
    kw = _common(hf, "qwen2_moe")
    n = kw["num_layers"]
    if not hf.get("layer_types") and hf.get("use_sliding_window"):  # transformers 5's Qwen2MoeConfig rule
        first = int(hf.get("max_window_layers") or QWEN2_MOE_DEFAULTS["max_window_layers"])
        hf = {**hf, "layer_types": ["sliding_attention" if (i + 1) % 2 and i < first else "full_attention"
                                    for i in range(n)]}
    kw["sliding_windows"] = _layer_windows(hf, n) if hf.get("use_sliding_window") else (None,) * n
    bias = bool(hf.get("qkv_bias", True))
    shared = hf.get("shared_expert_intermediate_size")
    return dict(kw, attention_bias=bias, o_proj_bias=False, router_weights_in_model_dtype=True,
                shared_expert_intermediate_size=int(QWEN2_MOE_DEFAULTS["shared_expert_intermediate_size"]
                                                    if shared is None else shared),
                **_experts(hf, "qwen2_moe", ("num_experts", "num_local_experts"), QWEN2_MOE_DEFAULTS))


MODEL_TYPES: dict[str, Adapter] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "granite": granite,
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": qwen3_moe,
}

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GraniteForCausalLM": "granite",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


def supported_model_types() -> list[str]:
    return sorted(MODEL_TYPES)


def adapter_for(hf: Mapping[str, Any]) -> Adapter:
    """The adapter for this HF config, by `model_type`, else by `architectures`."""
    model_type = hf.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    for arch in hf.get("architectures") or ():
        if arch in ARCHITECTURES:
            return MODEL_TYPES[ARCHITECTURES[arch]]
    raise ModelConfigError(
        f"unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
        f"supported model types: {', '.join(supported_model_types())}"
    )


def config_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ModelConfig keyword arguments for a parsed HF `config.json` of any supported model."""
    return adapter_for(hf)(hf)
