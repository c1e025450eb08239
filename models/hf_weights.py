"""How Hugging Face tensor names and layouts map onto our parameter tree.

HF `nn.Linear` stores weights as [out, in]; we store them as einsum-friendly arrays with
explicit head axes ([D, N, H] for q, [N, H, D] for o, [D, F] for the MLP in-projections).
The decoder layers' parameters are stacked on a leading layers axis, so the HF tensor of layer i
fills index i of its stacked parameter. A checkpoint that wraps the text model (Gemma 3's
Gemma3ForConditionalGeneration) names its tensors under a prefix (`text_model_name`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import numpy as np

from jaxserve.models.config import ModelConfig, ModelLoadError
from jaxserve.models.moe_weights import expert_tensors

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: Path  # where the tensor goes in the NNX state
    transform: Callable[[np.ndarray], np.ndarray]  # HF layout -> our layout
    hf_shape: tuple[int, ...]  # the shape the HF tensor must have
    layer: int | None = None  # index on the leading layers axis of a stacked parameter
    # Where in the layer's slice the tensor goes when it fills only a block of it (one expert of
    # an [E, ...] expert parameter, or its gate or up half): start indices after the layers axis;
    # the tensor's missing leading axes are size 1. () = the whole slice.
    offset: tuple[int, ...] = ()
    # Names of the tensors this one stands in for (a fused transformers 5 expert tensor covers
    # every per-expert tensor of its layer): loading it satisfies them, and it is never required.
    covers: tuple[str, ...] = ()


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _in_proj(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    def f(w: np.ndarray) -> np.ndarray:  # [heads * head_dim, D] -> [D, heads, head_dim]
        return np.ascontiguousarray(w.reshape(heads, head_dim, -1).transpose(2, 0, 1))

    return f


def _out_proj(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    def f(w: np.ndarray) -> np.ndarray:  # [D, heads * head_dim] -> [heads, head_dim, D]
        return np.ascontiguousarray(w.reshape(-1, heads, head_dim).transpose(1, 2, 0))

    return f


def _head_bias(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda b: b.reshape(heads, head_dim)


def weight_specs(cfg: ModelConfig) -> dict[str, WeightSpec]:
    """HF tensor name -> WeightSpec, for every tensor the model needs."""
    d, v = cfg.hidden_size, cfg.vocab_size
    specs = {
        "model.embed_tokens.weight": WeightSpec(("embed_tokens",), _same, (v, d)),
        "model.norm.weight": WeightSpec(("norm", "weight"), _same, (d,)),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = WeightSpec(("lm_head",), _transpose, (v, d))
    for i in range(cfg.num_layers):
        specs.update(_layer_specs(cfg, i))
    return specs


def _layer_specs(cfg: ModelConfig, i: int) -> dict[str, WeightSpec]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hf, ours = f"model.layers.{i}.", ("layers",)
    attn = ours + ("self_attn",)

    def spec(path: Path, transform: Callable[[np.ndarray], np.ndarray], hf_shape: tuple[int, ...]) -> WeightSpec:
        return WeightSpec(path, transform, hf_shape, layer=i)

    specs = {
        hf + "input_layernorm.weight": spec(ours + ("input_layernorm", "weight"), _same, (d,)),
        hf + "post_attention_layernorm.weight": spec(
            ours + ("post_attention_layernorm", "weight"), _same, (d,)),
        hf + "self_attn.q_proj.weight": spec(attn + ("q_proj",), _in_proj(n, h), (n * h, d)),
        hf + "self_attn.k_proj.weight": spec(attn + ("k_proj",), _in_proj(k, h), (k * h, d)),
        hf + "self_attn.v_proj.weight": spec(attn + ("v_proj",), _in_proj(k, h), (k * h, d)),
        hf + "self_attn.o_proj.weight": spec(attn + ("o_proj",), _out_proj(n, h), (d, n * h)),
        hf + "mlp.gate_proj.weight": spec(ours + ("mlp", "gate_proj"), _transpose, (f, d)),
        hf + "mlp.up_proj.weight": spec(ours + ("mlp", "up_proj"), _transpose, (f, d)),
        hf + "mlp.down_proj.weight": spec(ours + ("mlp", "down_proj"), _transpose, (d, f)),
    }
    if cfg.num_experts:  # the MoE block's tensors replace the dense MLP's
        for name in ("gate_proj", "up_proj", "down_proj"):
            del specs[hf + f"mlp.{name}.weight"]
        specs.update({name: WeightSpec(*fields) for name, fields in expert_tensors(cfg, i).items()})
    if cfg.attention_bias:
        specs.update({
            hf + "self_attn.q_proj.bias": spec(attn + ("q_bias",), _head_bias(n, h), (n * h,)),
            hf + "self_attn.k_proj.bias": spec(attn + ("k_bias",), _head_bias(k, h), (k * h,)),
            hf + "self_attn.v_proj.bias": spec(attn + ("v_bias",), _head_bias(k, h), (k * h,)),
        })
    if cfg.o_proj_bias:
        specs[hf + "self_attn.o_proj.bias"] = spec(attn + ("o_bias",), _same, (d,))
    if cfg.qk_norm:
        specs[hf + "self_attn.q_norm.weight"] = spec(attn + ("q_norm", "weight"), _same, (h,))
        specs[hf + "self_attn.k_norm.weight"] = spec(attn + ("k_norm", "weight"), _same, (h,))
    if cfg.gemma_norms:  # Gemma's sandwich: the MLP's own pre and post norms
        for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            specs[hf + norm + ".weight"] = spec(ours + (norm, "weight"), _same, (d,))
    if cfg.mlp_bias:
        specs.update({
            hf + "mlp.gate_proj.bias": spec(ours + ("mlp", "gate_bias"), _same, (f,)),
            hf + "mlp.up_proj.bias": spec(ours + ("mlp", "up_bias"), _same, (f,)),
            hf + "mlp.down_proj.bias": spec(ours + ("mlp", "down_bias"), _same, (d,)),
        })
    return specs


# Tensors some checkpoints carry that we derive or do not need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# Fused projections (Phi-3): HF tensor suffix -> the unfused tensors it holds, stacked on the
# output (row) axis in this order, with their row counts from the config.
def _fused_rows(cfg: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {
        "self_attn.qkv_proj.weight": (("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                                      ("self_attn.v_proj.weight", kv)),
        "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", f), ("mlp.up_proj.weight", f)),
    }


def split_fused(cfg: ModelConfig, tensors: Iterable[tuple[str, Callable[[], np.ndarray]]]
                ) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(name, loader) pairs with every fused tensor replaced by its unfused parts: Phi-3's
    `qkv_proj` [(N + 2 * K_hf) * H, D] becomes q/k/v_proj (rows q | k | v, K_hf the checkpoint's
    kv heads) and `gate_up_proj` [2F, D] becomes gate/up_proj (rows gate | up), which then load
    like any Llama tensor: kv-head replicas, sharding and Orbax conversion see only the parts. A
    fused tensor is read once; its parts are row slices of it (one tensor's memory on the host)."""
    fused = _fused_rows(cfg)
    for name, read in tensors:
        prefix, _, suffix = name.partition(".layers.")
        layer, _, rest = suffix.partition(".")
        parts = fused.get(rest) if suffix else None
        if parts is None:
            yield name, read
            continue
        tensor = read()
        rows = sum(n for _, n in parts)
        if tensor.shape != (rows, cfg.hidden_size):
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {(rows, cfg.hidden_size)} "
                                 f"from config.json ({cfg.model_type}: {' + '.join(p for p, _ in parts)})")
        start = 0
        for part, n in parts:
            yield f"{prefix}.layers.{layer}.{part}", (lambda t=tensor, lo=start, hi=start + n: t[lo:hi])
            start += n


# Wrapping checkpoints, by model_type: (prefix of the text model's tensors in transformers 5 and
# in 4.x, and the name it has in a text-only checkpoint), and the prefixes of the wrapper's other
# parts, which we do not load (text generation only).
TEXT_MODEL_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "gemma3": (("model.language_model.", "model."), ("language_model.model.", "model."),
               ("language_model.lm_head.", "lm_head.")),
}
NON_TEXT_PREFIXES: dict[str, tuple[str, ...]] = {
    "gemma3": ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector."),
}


def text_model_name(cfg: ModelConfig, name: str) -> str | None:
    """The name `weight_specs` knows checkpoint tensor `name` by, or None for a tensor of a
    wrapper's non-text part (vision tower, projector)."""
    if name.startswith(NON_TEXT_PREFIXES.get(cfg.model_type, ())):
        return None
    for prefix, text_prefix in TEXT_MODEL_PREFIXES.get(cfg.model_type, ()):
        if name.startswith(prefix):
            return text_prefix + name[len(prefix):]
    return name
