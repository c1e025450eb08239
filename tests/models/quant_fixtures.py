"""The oracle of weight quantization: a transformers model whose projection weights are replaced by
their quantized-then-dequantized values.

Every quantized projection of an HF checkpoint is an nn.Linear [out, in], and our per-output-channel
scale is one scale per HF row, so the reference quantizes each HF weight along its rows' axis (1) with
models.quantization.quantize and dequantizes with numpy (`dequantize_numpy`): it shares no layout code
with the loader (which quantizes in our [D, N, H] / [N, H, D] / [D, F] layouts).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from jaxserve.models.quantization import dequantize_numpy, quantize

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_fake_quantized(model, mode: str):
    """A float32 copy of the transformers model with every decoder projection weight W [out, in]
    replaced by dequantize(quantize(W, per row)): what a `quantization=mode` engine computes with."""
    ref = copy.deepcopy(model).float()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".layers." in name and name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
                q, scale = quantize(p.detach().numpy(), (1,), mode)
                p.copy_(torch.from_numpy(dequantize_numpy(np.asarray(q), np.asarray(scale))))
    return ref
