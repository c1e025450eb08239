"""The oracle of weight quantization: a transformers model whose projection weights are replaced by
their quantized-then-dequantized values.

Every quantized projection of an HF checkpoint is an nn.Linear [out, in] (a mixture of experts' fused
expert weights [E, out, in]), and our per-output-channel scale is one scale per HF row, so the
reference quantizes each HF weight along its rows' (last) axis with
models.quantization.quantize and dequantizes with numpy (`dequantize_numpy`): it shares no layout code
with the loader (which quantizes in our [D, N, H] / [N, H, D] / [D, F] layouts).
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import torch

from jaxserve.models.quantization import dequantize_numpy, quantize

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_fake_quantized(model, mode: str, activations: bool = False):
    """A float32 copy of the transformers model with every decoder projection weight W [out, in]
    replaced by dequantize(quantize(W, per row)): what a `quantization=mode` engine computes with.
    activations (w8a8): each projection's input is also quantized and dequantized per token (its
    last axis, numpy: absmax / qmax, int8 rounded or e4m3 by ml_dtypes) by a forward pre-hook."""
    ref = copy.deepcopy(model).float()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            projection = name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS
            experts = name.endswith((".experts.gate_up_proj", ".experts.down_proj"))  # [E, out, in]
            if ".layers." in name and (projection or experts):
                q, scale = quantize(p.detach().numpy(), (p.ndim - 1,), mode)
                p.copy_(torch.from_numpy(dequantize_numpy(np.asarray(q), np.asarray(scale))))
    if activations:
        for name, module in ref.named_modules():
            if ".layers." in name and name.split(".")[-1] in PROJECTIONS:
                module.register_forward_pre_hook(lambda m, args: (fake_quantize_tokens(args[0], mode),))
    return ref


def fake_quantize_tokens(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x [..., in] -> q * scale with a symmetric absmax scale per token (row), in numpy."""
    a = x.detach().numpy().astype(np.float32)
    qmax = 127.0 if mode == "int8" else 448.0
    amax = np.abs(a).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax * np.float32(1 / qmax), 1).astype(np.float32)
    y = np.clip(a / scale, -qmax, qmax)
    y = np.rint(y) if mode == "int8" else y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return torch.from_numpy((y * scale).astype(np.float32))
