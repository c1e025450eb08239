"""Pre-quantized Hugging Face checkpoints: `quantization_config` in config.json selects the path.

Supported (8-bit weights, symmetric; what vLLM serves for Llama-3.x FP8 / INT8 checkpoints):

  quant_method "fp8"                 float8_e4m3fn `weight` + `weight_scale`, one per tensor or per
                                     output channel; block-wise `weight_scale_inv` (weight_block_size)
  quant_method "compressed-tensors"  format float-quantized (fp8) / int-quantized (int8 w8a8) /
                                     naive-quantized (int8 w8a16), `weight` + `weight_scale` with
                                     strategy tensor, channel or group

A per-tensor or per-channel checkpoint loads as it is: its 8-bit values are our values and its
scale is our per-output-channel scale (a per-tensor scale repeated over the channels), so nothing
is rounded again. Group-wise and block-wise scales do not fit one scale per output channel: those
weights are dequantized and quantized again per output channel (a second rounding, logged).
Activation scales (`input_scale`, static or dynamic w8a8) are not used: activations stay in the
model dtype (weight-only), which is at least as accurate. Anything else (another quant_method,
4-bit compressed-tensors, asymmetric zero points, a compressed-tensors config not yet compressed)
is refused at load, naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from jaxserve.models.errors import ModelLoadError
from jaxserve.models.quantization import QUANTIZED_WEIGHTS

log = logging.getLogger(__name__)

# Tensors beside a quantized weight: its scale (read with it), and what we do not use.
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")
UNUSED_SUFFIXES = (".input_scale", ".weight_zero_point", ".k_scale", ".v_scale", ".output_scale",
                   ".weight_global_scale", ".input_global_scale")
COMPRESSED_TENSORS_FORMATS = {"float-quantized": "fp8", "int-quantized": "int8", "naive-quantized": None}


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What a checkpoint's quantization_config says about its linear weights."""

    method: str  # "fp8" | "compressed-tensors"
    mode: str  # our quantization of the projections: "int8" | "fp8"
    strategy: str  # "tensor-or-channel" (from each scale's shape) | "group" | "block"
    scale_suffix: str = ".weight_scale"  # ".weight_scale_inv" for block-wise fp8
    group_size: int | None = None  # strategy "group": input columns per scale
    block: tuple[int, int] | None = None  # strategy "block": (rows, columns) per scale
    activations: str | None = None  # the checkpoint's activation scheme (not used: weight-only)

    def describe(self) -> str:
        extra = {"group": f", group_size {self.group_size}", "block": f", blocks {self.block}"}.get(self.strategy, "")
        acts = f", activations {self.activations} (not used: weight-only)" if self.activations else ""
        return f"{self.method} {self.mode} weights, {self.strategy} scales{extra}{acts}"


def read_scheme(hf: Mapping[str, Any]) -> Scheme | None:
    """The checkpoint's Scheme from config.json (None: not pre-quantized); an unsupported
    quantization_config raises ModelLoadError naming the field and value."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise ModelLoadError(f"quantization_config must be a mapping, got {qc!r}")
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8_scheme(qc)
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(qc)
    raise ModelLoadError(f"quantization_config.quant_method {method!r} is not supported; supported: 'fp8', "
                         "'compressed-tensors' (8-bit fp8 / int8 weights)")


def _fp8_scheme(qc: Mapping[str, Any]) -> Scheme:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ModelLoadError(f"quantization_config.fmt {fmt!r} is not supported (fp8 checkpoints: 'e4m3')")
    acts = qc.get("activation_scheme")
    block = qc.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                             for b in block)):
            raise ModelLoadError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}")
        return Scheme("fp8", "fp8", "block", ".weight_scale_inv", block=tuple(block), activations=acts)
    return Scheme("fp8", "fp8", "tensor-or-channel", activations=acts)


def _compressed_tensors_scheme(qc: Mapping[str, Any]) -> Scheme:
    fmt = qc.get("format")
    if fmt not in COMPRESSED_TENSORS_FORMATS:
        raise ModelLoadError(f"compressed-tensors quantization_config.format {fmt!r} is not supported; supported: "
                             f"{', '.join(COMPRESSED_TENSORS_FORMATS)}")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ModelLoadError(f"compressed-tensors quantization_config.quantization_status {status!r} is not supported "
                             "(only 'compressed' checkpoints)")
    groups = qc.get("config_groups") or {}
    weights = [(name, (g or {}).get("weights")) for name, g in groups.items()]
    if not weights or any(w is None for _, w in weights):
        raise ModelLoadError("compressed-tensors quantization_config.config_groups must give every group "
                             f"`weights`, got {dict(groups)!r}")
    first = weights[0][1]
    if any(w != first for _, w in weights):
        raise ModelLoadError("compressed-tensors config_groups with different weight schemes are not supported: "
                             + ", ".join(f"{n}: {w}" for n, w in weights))
    bits, kind, strategy = first.get("num_bits"), first.get("type"), first.get("strategy")
    if bits != 8 or kind not in ("int", "float"):
        raise ModelLoadError(f"compressed-tensors weights num_bits={bits!r} type={kind!r} are not supported "
                             "(8-bit int or float)")
    if not first.get("symmetric", True):
        raise ModelLoadError("compressed-tensors weights symmetric=false (zero points) are not supported")
    if first.get("dynamic"):
        raise ModelLoadError("compressed-tensors weights dynamic=true are not supported")
    mode = "fp8" if kind == "float" else "int8"
    if COMPRESSED_TENSORS_FORMATS[fmt] not in (None, mode):
        raise ModelLoadError(f"compressed-tensors format {fmt!r} with weights type {kind!r} is inconsistent")
    group = (groups[weights[0][0]] or {})
    acts = group.get("input_activations")
    acts_text = None if not acts else f"{acts.get('type')}{acts.get('num_bits')} {acts.get('strategy')}"
    if strategy in ("tensor", "channel"):
        return Scheme("compressed-tensors", mode, "tensor-or-channel", activations=acts_text)
    if strategy == "group":
        size = first.get("group_size")
        if not isinstance(size, int) or size <= 0:
            raise ModelLoadError(f"compressed-tensors group strategy needs a positive group_size, got {size!r}")
        return Scheme("compressed-tensors", mode, "group", group_size=size, activations=acts_text)
    raise ModelLoadError(f"compressed-tensors weights strategy {strategy!r} is not supported; supported: "
                         "tensor, channel, group")


def is_projection_weight(name: str) -> bool:
    """`model.layers.{i}.self_attn.q_proj.weight` and the other projections of QUANTIZED_WEIGHTS."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED_WEIGHTS and ".layers." in name


def is_aux(name: str) -> bool:
    """A scale or other quantization tensor (not a parameter of its own)."""
    return name.endswith(SCALE_SUFFIXES + UNUSED_SUFFIXES)


def collect_scales(tensors: Iterable[tuple[str, Callable[[], np.ndarray]]]) -> tuple[dict[str, np.ndarray], int]:
    """First pass over the checkpoint: {weight name: its scale (float32)} and how many activation
    scales / zero points / KV scales were found and are not used. Zero points must be zero."""
    scales, unused = {}, 0
    for name, read in tensors:
        if name.endswith(SCALE_SUFFIXES):
            scales[name.rsplit(".", 1)[0] + ".weight"] = np.asarray(read(), np.float32)
        elif name.endswith(".weight_zero_point"):
            if np.any(np.asarray(read(), np.float32) != 0):
                raise ModelLoadError(f"{name}: non-zero weight zero points (asymmetric quantization) are not supported")
            unused += 1
        elif name.endswith(UNUSED_SUFFIXES):
            unused += 1
    return scales, unused


def split_weight(scheme: Scheme, name: str, tensor: np.ndarray,
                 scales: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """A checkpoint projection weight [out, in] -> (values, scale per output row float32 [out]),
    stored as they are; or (float32 weight, None) when its scales are group- or block-wise (the
    loader then quantizes it per output channel) or it was left unquantized (an ignored module)."""
    if tensor.dtype not in (np.int8, ml_dtypes.float8_e4m3fn):
        return tensor, None  # not quantized in the checkpoint: quantized at load like any float weight
    want = np.int8 if scheme.mode == "int8" else ml_dtypes.float8_e4m3fn
    if tensor.dtype != want:
        raise ModelLoadError(f"tensor {name!r} is {tensor.dtype}, but quantization_config says {scheme.mode}")
    if name not in scales:
        raise ModelLoadError(f"tensor {name!r} is {tensor.dtype} but the checkpoint has no "
                             f"{name[:-len('.weight')]}{scheme.scale_suffix}")
    scale, (rows, cols) = scales[name], tensor.shape
    if scheme.strategy == "tensor-or-channel":
        if scale.size == 1:
            return tensor, np.full((rows,), scale.reshape(()), np.float32)
        if scale.size == rows and scale.shape in ((rows,), (rows, 1)):
            return tensor, scale.reshape(rows)
        raise ModelLoadError(f"scale of {name!r} has shape {scale.shape}: expected one per tensor or per output "
                             f"channel ({rows})")
    if scheme.strategy == "group":
        g = scheme.group_size
        want_shape = (rows, -(-cols // g))
        expand = lambda s: np.repeat(s, g, axis=1)[:, :cols]  # noqa: E731
    else:
        br, bc = scheme.block
        want_shape = (-(-rows // br), -(-cols // bc))
        expand = lambda s: np.repeat(np.repeat(s, br, axis=0), bc, axis=1)[:rows, :cols]  # noqa: E731
    if scale.shape != want_shape:
        raise ModelLoadError(f"scale of {name!r} has shape {scale.shape}, expected {want_shape} ({scheme.strategy})")
    return tensor.astype(np.float32) * expand(scale), None


def scale_in_layout(transform: Callable[[np.ndarray], np.ndarray], rows_scale: np.ndarray,
                    shape: tuple[int, int], contract: tuple[int, ...]) -> np.ndarray:
    """A per-output-row scale [out] -> our scale layout: the weight's layout (`transform` of the HF
    [out, in] tensor) with size 1 on the contracted axes."""
    full = transform(np.broadcast_to(rows_scale[:, None], shape))
    return np.ascontiguousarray(full[tuple(slice(0, 1) if i in contract else slice(None)
                                           for i in range(full.ndim))], np.float32)


def read_safetensors_raw(file: Path, name: str) -> np.ndarray:
    """One tensor read from the file's bytes: safetensors' numpy reader knows no float8 dtype."""
    dtypes = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(size))[name]
        start, stop = entry["data_offsets"]
        f.seek(8 + size + start)
        data = f.read(stop - start)
    return np.frombuffer(data, np.uint8).view(dtypes[entry["dtype"]]).reshape(entry["shape"])


def log_scheme(scheme: Scheme, unused: int) -> None:
    log.info("pre-quantized checkpoint: %s", scheme.describe())
    if scheme.strategy in ("group", "block"):
        log.warning("the checkpoint's %s-wise weight scales are dequantized and quantized again per output channel "
                    "to %s at load (one more rounding)", scheme.strategy, scheme.mode)
    if unused:
        log.info("%d activation / KV / zero-point quantization tensors of the checkpoint are not used", unused)
