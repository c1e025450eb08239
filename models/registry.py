"""Registry of supported architectures, keyed by HF `model_type` and `architectures`.

Every supported model runs on the one shared decoder (`models.decoder.CausalLM`); an adapter
turns its HF config into a `ModelConfig` with the right flags.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from models.config import ModelConfig, ModelConfigError, checkpoint_dtype, eos_ids, read_rope

Adapter = Callable[[Mapping[str, Any]], ModelConfig]


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


def llama(hf: Mapping[str, Any]) -> ModelConfig:
    kw = _common(hf, "llama")
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**kw, attention_bias=bias, o_proj_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def mistral(hf: Mapping[str, Any]) -> ModelConfig:
    kw = _common(hf, "mistral")
    window = hf.get("sliding_window")
    kw["sliding_windows"] = (int(window) if window else None,) * kw["num_layers"]
    return ModelConfig(**kw)


def qwen2(hf: Mapping[str, Any]) -> ModelConfig:
    kw = _common(hf, "qwen2")
    kw["sliding_windows"] = _layer_windows(hf, kw["num_layers"])
    return ModelConfig(**kw, attention_bias=True, o_proj_bias=False)


def qwen3(hf: Mapping[str, Any]) -> ModelConfig:
    kw = _common(hf, "qwen3")
    kw["sliding_windows"] = _layer_windows(hf, kw["num_layers"])
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**kw, attention_bias=bias, o_proj_bias=bias, qk_norm=True)


def granite(hf: Mapping[str, Any]) -> ModelConfig:
    kw = _common(hf, "granite")
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **kw,
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
    )


MODEL_TYPES: dict[str, Adapter] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "granite": granite,
}

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GraniteForCausalLM": "granite",
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
