"""PEFT adapters over the engine test model, written locally, and their transformers + peft twins
(the oracle of the multi-LoRA tests)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

# (rank, target modules, use_rslora) of the three adapters the tests serve
ADAPTERS = {
    "alpha": (4, ("q_proj", "v_proj"), False),
    "beta": (8, ("k_proj", "o_proj", "gate_proj", "down_proj"), True),
    "gamma": (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False),
}


def write_adapter(base_dir: Path, out_dir: Path, r: int, targets, use_rslora: bool, seed: int):
    """Saves a PEFT LoRA adapter for the model in base_dir (both halves random: PEFT starts lora_B
    at zero, which would make the delta 0) and returns the peft model applying it (eval mode)."""
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                      lora_dropout=0.0, use_rslora=use_rslora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out_dir)
    return model.eval()


def write_adapters(base_dir: Path, root: Path) -> dict[str, tuple[Path, object]]:
    """name -> (adapter directory, peft model) for every adapter of ADAPTERS."""
    out = {}
    for seed, (name, (r, targets, rslora)) in enumerate(ADAPTERS.items(), start=1):
        d = root / name
        out[name] = (d, write_adapter(base_dir, d, r, targets, rslora, seed))
    return out
