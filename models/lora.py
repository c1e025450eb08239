"""Hugging Face PEFT LoRA adapters read from a local directory (issue 18: the host side).

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. We accept plain
LoRA on the decoder's linear projections (q/k/v/o/gate/up/down); anything we would apply wrongly
(DoRA, bias terms, embedding or LM-head adapters, unknown modules, a rank above the engine's
`max_lora_rank`, shapes that do not match the base model) is refused with a ValueError naming it.

The weights come back per layer and module as A [in, r] and B [r, out] (float32 numpy, PEFT's
`lora_A.weight` [r, in] and `lora_B.weight` [out, r] transposed), with the scaling
(`lora_alpha / r`, or `lora_alpha / sqrt(r)` under `use_rslora`) folded into B, so that
delta(x) = (x @ A) @ B. `pad_to_slot` pads one adapter to the fixed slot rank and `lora_delta`
computes a mixed-slot batch by gather + einsum (flat shapes). The device side (stacked slots per
projection, the decoder hook) is models.lora_layers; the engine's registry and slot manager is
jaxserve.engine.lora_manager.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REFUSED_MODULES = ("embed_tokens", "lm_head")


@dataclasses.dataclass(frozen=True)
class LoRAAdapterConfig:
    """The parts of PEFT's adapter_config.json that we apply; validated on construction."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"adapter_config.json: r must be a positive integer, got {self.r!r}")
        if not self.target_modules:
            raise ValueError("adapter_config.json: target_modules is empty")
        for m in self.target_modules:
            if m in REFUSED_MODULES:
                raise ValueError(f"adapter_config.json: target module {m!r} (embedding/LM-head adapters) is not supported")
            if m not in SUPPORTED_MODULES:
                raise ValueError(f"adapter_config.json: target module {m!r} is not supported; supported: {SUPPORTED_MODULES}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAAdapterConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
        if d.get("use_dora"):
            raise ValueError("adapter_config.json: use_dora (DoRA) is not supported")
        if d.get("bias", "none") != "none":
            raise ValueError(f"adapter_config.json: bias {d.get('bias')!r} is not supported (only 'none')")
        for field in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
            if d.get(field):
                raise ValueError(f"adapter_config.json: {field} is not supported")
        tm = d.get("target_modules")
        if isinstance(tm, str):
            raise ValueError(f"adapter_config.json: target_modules as a regex ({tm!r}) is not supported; list the modules")
        return cls(r=d.get("r"), lora_alpha=float(d.get("lora_alpha", 8)),
                   target_modules=tuple(sorted(tm or ())), use_rslora=bool(d.get("use_rslora", False)))


_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def load_lora_adapter(path, module_shapes: dict[str, tuple[int, int]], num_layers: int,
                      max_lora_rank: int) -> tuple[LoRAAdapterConfig, dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]]:
    """Read a PEFT adapter directory. module_shapes: module name -> (in, out) of the base model's
    projection. Returns the config and {(layer, module): (A [in, r], B [r, out] * scaling)}."""
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise ValueError(f"LoRA adapter at {str(path)!r}: needs adapter_config.json and adapter_model.safetensors")
    cfg = LoRAAdapterConfig.from_dict(json.loads(cfg_file.read_text()))
    if cfg.r > max_lora_rank:
        raise ValueError(f"LoRA adapter at {str(path)!r}: rank r={cfg.r} exceeds max_lora_rank={max_lora_rank}")
    raw = load_file(str(w_file))
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, w in raw.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"LoRA adapter at {str(path)!r}: tensor {key!r} is not a supported LoRA weight")
        layer, module, ab = int(m[1]), m[2], m[3]
        if module not in cfg.target_modules:
            raise ValueError(f"LoRA adapter at {str(path)!r}: tensor {key!r} targets {module!r}, not in target_modules")
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter at {str(path)!r}: tensor {key!r} names layer {layer}; the base model has {num_layers}")
        halves.setdefault((layer, module), {})[ab] = np.asarray(w, np.float32)
    out = {}
    for (layer, module), h in sorted(halves.items()):
        if set(h) != {"A", "B"}:
            raise ValueError(f"LoRA adapter at {str(path)!r}: layer {layer} {module} lacks lora_A or lora_B")
        d_in, d_out = module_shapes[module]
        a, b = h["A"], h["B"]  # PEFT: A [r, in], B [out, r]
        if a.shape != (cfg.r, d_in) or b.shape != (d_out, cfg.r):
            raise ValueError(f"LoRA adapter at {str(path)!r}: layer {layer} {module}: lora_A {a.shape} / lora_B {b.shape} "
                             f"do not match the base model ({d_in} -> {d_out}, r={cfg.r})")
        out[(layer, module)] = (a.T.copy(), (b.T * cfg.scaling).astype(np.float32))
    return cfg, out


def pad_to_slot(a: np.ndarray, b: np.ndarray, max_lora_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """One adapter's A [in, r] / B [r, out] zero-padded to A [in, R] / B [R, out] (R = max_lora_rank),
    the fixed per-slot shape of the stacked arrays; the padding adds exact zeros to the delta."""
    r = a.shape[1]
    if r > max_lora_rank:
        raise ValueError(f"rank {r} exceeds max_lora_rank={max_lora_rank}")
    return (np.pad(a, ((0, 0), (0, max_lora_rank - r))), np.pad(b, ((0, max_lora_rank - r), (0, 0))))


def lora_delta(x, a_stack, b_stack, slots):
    """The low-rank delta of every token of a flat batch, each with its own adapter slot
    (slot 0 holds zeros = no adapter), by gather + einsum.

    x [T, in], a_stack [S, in, R], b_stack [S, R, out], slots int32 [T] -> [T, out]."""
    import jax.numpy as jnp

    a = jnp.take(a_stack, slots, axis=0)  # [T, in, R]
    b = jnp.take(b_stack, slots, axis=0)  # [T, R, out]
    xa = jnp.einsum("ti,tir->tr", x.astype(a.dtype), a)  # [T, R]
    return jnp.einsum("tr,tro->to", xa, b).astype(x.dtype)  # [T, out]
