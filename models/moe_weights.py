"""Hugging Face tensor names of the mixture-of-experts block (models.moe), in both forms a
checkpoint may use.

Per expert (the published Mixtral and Qwen-MoE safetensors, and what transformers 5's
save_pretrained writes by default): one [F, D] / [D, F] tensor per expert and projection,

    Mixtral     model.layers.{i}.block_sparse_moe.gate.weight                 [E, D]
                model.layers.{i}.block_sparse_moe.experts.{e}.w1|w3|w2.weight  gate | up | down
    Qwen-MoE    model.layers.{i}.mlp.gate.weight                               [E, D]
                model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight

Fused (transformers 5's own module layout, saved with save_original_format=False), for both
families under `mlp.`: `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows, then up) and
`mlp.experts.down_proj` [E, D, F]. Each fused tensor `covers` its layer's per-expert names.

Ours: router [D, E]; gate_up_proj [E, D, 2F] (gate columns, then up); down_proj [E, F, D]; a
per-expert tensor fills its block (`offset`) of the layer's slice. Qwen2-MoE's shared expert is a
dense MLP (`mlp.shared_expert.*`) and its gate `mlp.shared_expert_gate.weight` [1, D].
"""

from __future__ import annotations

import numpy as np

from jaxserve.models.config import ModelConfig

# What models.hf_weights.WeightSpec takes (it wraps these; this module sits below it):
# (path, transform, hf_shape, layer, offset, covers).
Tensor = tuple

# Per-expert names of the gate, up and down projections, and the block prefix, per family.
PER_EXPERT = {
    "mixtral": ("block_sparse_moe.", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp.", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp.", ("gate_proj", "up_proj", "down_proj")),
}


def _transpose(x: np.ndarray) -> np.ndarray:  # [out, in] -> [in, out]
    return np.ascontiguousarray(x.T)


def _swap_last(x: np.ndarray) -> np.ndarray:  # [E, out, in] -> [E, in, out]
    return np.ascontiguousarray(x.transpose(0, 2, 1))


def _tensor(path, transform, hf_shape, layer, offset=(), covers=()) -> Tensor:
    """The fields of models.hf_weights.WeightSpec, in its order."""
    return (path, transform, hf_shape, layer, offset, covers)


def expert_tensors(cfg: ModelConfig, i: int) -> dict[str, Tensor]:
    """HF tensor name -> models.hf_weights.WeightSpec fields for the MoE block of layer i, both forms."""
    if cfg.model_type not in PER_EXPERT:
        raise ValueError(f"no expert tensor names for model_type {cfg.model_type!r}; known: {sorted(PER_EXPERT)}")
    d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    block, (gate, up, down) = PER_EXPERT[cfg.model_type]
    hf, ours = f"model.layers.{i}.", ("layers", "mlp")
    router = hf + block + "gate.weight"
    specs = {router: _tensor(ours + ("router",), _transpose, (e, d), i)}
    per_expert: list[str] = []
    for j in range(e):
        name = hf + block + f"experts.{j}."
        specs[name + f"{gate}.weight"] = _tensor(ours + ("gate_up_proj",), _transpose, (f, d), i, (j, 0, 0))
        specs[name + f"{up}.weight"] = _tensor(ours + ("gate_up_proj",), _transpose, (f, d), i, (j, 0, f))
        specs[name + f"{down}.weight"] = _tensor(ours + ("down_proj",), _transpose, (d, f), i, (j, 0, 0))
        per_expert += [name + f"{p}.weight" for p in (gate, up, down)]
    fused = hf + "mlp."
    gate_up = tuple(n for n in per_expert if not n.endswith(f".{down}.weight"))
    specs[fused + "experts.gate_up_proj"] = _tensor(ours + ("gate_up_proj",), _swap_last, (e, 2 * f, d), i,
                                                       covers=gate_up)
    specs[fused + "experts.down_proj"] = _tensor(ours + ("down_proj",), _swap_last, (e, d, f), i,
                                                    covers=tuple(n for n in per_expert if n not in gate_up))
    if fused + "gate.weight" != router:  # Mixtral's fused form renames block_sparse_moe. to mlp.
        specs[fused + "gate.weight"] = _tensor(ours + ("router",), _transpose, (e, d), i, covers=(router,))
    fs = cfg.shared_expert_intermediate_size
    if fs:
        shared = ours + ("shared_expert",)
        specs.update({
            fused + "shared_expert.gate_proj.weight": _tensor(shared + ("gate_proj",), _transpose, (fs, d), i),
            fused + "shared_expert.up_proj.weight": _tensor(shared + ("up_proj",), _transpose, (fs, d), i),
            fused + "shared_expert.down_proj.weight": _tensor(shared + ("down_proj",), _transpose, (d, fs), i),
            fused + "shared_expert_gate.weight": _tensor(ours + ("shared_expert_gate",), _transpose, (1, d), i),
        })
    return specs
