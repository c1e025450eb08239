"""Registry of supported architectures, keyed by HF `model_type` and `architectures`.

Every supported model runs on the one shared decoder (`models.decoder.CausalLM`; Gemma's
layers and norms from `models.gemma`, chosen by the `gemma_norms` flag); an adapter turns its HF
config into the keyword arguments of a `ModelConfig` with the right flags (`ModelConfig.from_hf`
builds and validates it) and refuses what it does not support, naming the key. Both config
forms are read: transformers 4 (`torch_dtype`, top-level `rope_theta`, `rope_scaling`) and
transformers 5 (`dtype`, nested `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from jaxserve.models.activations import ACTIVATIONS
from jaxserve.models.errors import ModelConfigError
from jaxserve.models.rope import SUPPORTED_ROPE_TYPES, RopeConfig

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
    if rope_type == "longrope":
        kwargs.update(_longrope_fields(hf, merged))
    return RopeConfig(**kwargs)


def _longrope_fields(hf: Mapping[str, Any], merged: Mapping[str, Any]) -> dict[str, Any]:
    """LongRoPE settings as transformers resolves them: the top-level original_max_position_embeddings
    wins over the rope dict's (else max_position_embeddings); `factor` defaults to
    max_position_embeddings / original (it sets the default attention factor)."""
    for key in ("short_factor", "long_factor"):
        if not merged.get(key):
            raise ModelConfigError(f"rope type 'longrope' needs rope_scaling / rope_parameters key {key!r} "
                                   f"(one factor per rotary frequency), got {merged.get(key)!r}")
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    original = int(hf.get("original_max_position_embeddings") or merged.get("original_max_position_embeddings")
                   or max_pos)
    factor = merged.get("factor")
    return dict(short_factor=tuple(float(v) for v in merged["short_factor"]),
                long_factor=tuple(float(v) for v in merged["long_factor"]),
                original_max_position_embeddings=original,
                factor=float(factor) if factor is not None else max_pos / original)


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


PHI3_ORIGINAL_MAX_POSITIONS = 4096  # Phi3Config's default original_max_position_embeddings


def phi3(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM): the Llama decoder with fused qkv_proj and
    gate_up_proj (split at load, models.hf_weights.split_fused), LongRoPE and partial rotary.
    RoPE as Phi3Config reads it: rope type 'su' and 'yarn' mean 'longrope', only 'default' and
    'longrope' are accepted, the top-level original_max_position_embeddings (default 4096) is the
    one longrope uses, partial_rotary_factor comes from the rope dict or the top level. One sliding
    window for every layer (none when it covers max_position_embeddings)."""
    rope = {**dict(hf.get("rope_scaling") or {}), **dict(hf.get("rope_parameters") or {})}
    rope_type = rope.pop("type", None) or rope.get("rope_type") or "default"
    rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
    if rope_type not in ("default", "longrope"):
        raise ModelConfigError(f"phi3 rope_scaling / rope_parameters rope_type {rope_type!r} is not supported; "
                               "Phi-3 takes 'longrope' (also written 'su' or 'yarn') or none")
    hf = {**hf, "rope_parameters": {**rope, "rope_type": rope_type}, "rope_scaling": None,
          "original_max_position_embeddings": hf.get("original_max_position_embeddings") or PHI3_ORIGINAL_MAX_POSITIONS}
    kw = _common(hf, "phi3")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None:
        if not isinstance(partial, (int, float)) or isinstance(partial, bool):
            raise ModelConfigError(f"phi3 partial_rotary_factor must be a number, got {partial!r}")
        kw["rope"] = dataclasses.replace(kw["rope"], partial_rotary_factor=float(partial))
    kw["rope"].rotary_dim(kw["head_dim"])  # refuses odd rotary dims and factor lists of the wrong length
    window = hf.get("sliding_window")
    if window and int(window) < kw["max_position_embeddings"]:
        kw["sliding_windows"] = (int(window),) * kw["num_layers"]
    return kw


# Gemma 2 / 3 (models.gemma). transformers' config classes fill every key a config.json leaves
# out (gemma-3-4b's text_config names six), so the adapters start from the same defaults.
GEMMA2_DEFAULTS: dict[str, Any] = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
    rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True, attention_bias=False,
    query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = dict(
    GEMMA2_DEFAULTS, vocab_size=262208, max_position_embeddings=131072, final_logit_softcapping=None,
    attn_logit_softcapping=None)
GEMMA_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gemma_windows(hf: Mapping[str, Any], pattern: int) -> tuple[int | None, ...]:
    """Per-layer windows from `layer_types`, else every `pattern`-th layer global (the rest sliding)."""
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                      for i in range(n)]
    if len(types) != n or any(t not in GEMMA_LAYER_TYPES for t in types):
        raise ModelConfigError(f"layer_types must list {n} of {', '.join(GEMMA_LAYER_TYPES)}, got {types!r}")
    window = hf.get("sliding_window")
    if "sliding_attention" in types and not window:
        raise ModelConfigError(f"sliding_window is {window!r} but layer_types has sliding_attention layers")
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _gemma_common(hf: Mapping[str, Any], model_type: str, pattern: int) -> dict[str, Any]:
    """The fields Gemma 2 and 3 share, from a config with the defaults filled in."""
    if hf.get("use_bidirectional_attention"):
        raise ModelConfigError("use_bidirectional_attention is not supported (causal decoding only)")
    act = hf["hidden_activation"]  # what Gemma's MLP reads (hidden_act, where present, is not used)
    if act not in ACTIVATIONS:
        raise ModelConfigError(f"hidden_activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    kw = _common(hf, model_type)
    bias = bool(hf["attention_bias"])
    return dict(kw, gemma_norms=True, hidden_act=act, attention_bias=bias,
                o_proj_bias=bias, sliding_windows=_gemma_windows(hf, pattern),
                tie_word_embeddings=bool(hf["tie_word_embeddings"]),
                attention_multiplier=float(hf["query_pre_attn_scalar"]) ** -0.5,
                embedding_multiplier=float(hf["hidden_size"]) ** 0.5)


def gemma2(hf: Mapping[str, Any]) -> dict[str, Any]:
    hf = {**GEMMA2_DEFAULTS, **hf}
    final, attn = hf["final_logit_softcapping"], hf["attn_logit_softcapping"]
    return dict(_gemma_common(hf, "gemma2", pattern=2),  # even layers sliding, odd global
                final_logit_softcap=None if final is None else float(final),
                attn_logit_softcap=None if attn is None else float(attn))


def _gemma3_ropes(text: Mapping[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """(global, local) RoPE from transformers 5 `rope_parameters` keyed by layer type, or 4.x
    `rope_theta` + `rope_scaling` (global) and `rope_local_base_freq` (local), merged as
    Gemma3TextConfig.convert_rope_params_to_dict does."""
    params = dict(text.get("rope_parameters") or {})
    unknown = sorted(set(params) - set(GEMMA_LAYER_TYPES))
    if unknown:
        raise ModelConfigError(f"rope_parameters of a Gemma 3 config must be keyed by layer type "
                               f"({', '.join(GEMMA_LAYER_TYPES)}), got keys {unknown}")
    scaling = dict(text.get("rope_scaling") or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    full = {**(params.get("full_attention") or {}), **scaling}
    local = dict(params.get("sliding_attention") or {})
    return (read_rope({"rope_parameters": full, "rope_theta": text.get("rope_theta", 1_000_000.0)}),
            read_rope({"rope_parameters": local, "rope_theta": text.get("rope_local_base_freq", 10_000.0)}))


def gemma3_text(hf: Mapping[str, Any], model_type: str = "gemma3_text") -> dict[str, Any]:
    """Gemma3ForCausalLM. Its attention never applies attn_logit_softcapping (transformers'
    Gemma3Attention does not pass it on), so neither do we."""
    hf = {**GEMMA3_TEXT_DEFAULTS, **hf}
    rope, sliding_rope = _gemma3_ropes(hf)
    final = hf["final_logit_softcapping"]
    kw = _gemma_common(hf, model_type, pattern=int(hf.get("sliding_window_pattern") or 6))
    if sliding_rope == rope or all(w is None for w in kw["sliding_windows"]):
        sliding_rope = None
    return dict(kw, qk_norm=True, rope=rope, sliding_rope=sliding_rope,
                final_logit_softcap=None if final is None else float(final))


def gemma3(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The language model of a Gemma3ForConditionalGeneration checkpoint (text generation only:
    the vision tower and projector are not loaded, see models.hf_weights). Its LM head applies no
    final soft cap (transformers' Gemma3ForConditionalGeneration does not), the embedding tie
    is the outer config's, and so are eos / bos / dtype where the outer config names them."""
    text = dict(hf.get("text_config") or {})
    for key in ("eos_token_id", "bos_token_id", "dtype", "torch_dtype"):
        if hf.get(key) is not None:
            text[key] = hf[key]
    text["tie_word_embeddings"] = hf.get("tie_word_embeddings", True)
    return dict(gemma3_text(text, model_type="gemma3"), final_logit_softcap=None)


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
    "phi3": phi3,
    "gemma2": gemma2,
    "gemma3_text": gemma3_text,
    "gemma3": gemma3,
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
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma3ForConditionalGeneration": "gemma3",
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
