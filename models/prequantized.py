"""Pre-quantized Hugging Face checkpoints: `quantization_config` in config.json selects the path.

Supported (8-bit weights, symmetric; what vLLM serves for Llama-3.x FP8 / INT8 checkpoints):

  quant_method "fp8"                 float8_e4m3fn `weight` + `weight_scale`, one per tensor or per
                                     output channel; block-wise `weight_scale_inv` (weight_block_size)
  quant_method "compressed-tensors"  format float-quantized (fp8) / int-quantized (int8 w8a8) /
                                     naive-quantized (int8 w8a16), `weight` + `weight_scale` with
                                     strategy tensor, channel or group

  4-bit, group-wise, unpacked to int8 at load (logged):
  quant_method "awq"                 AutoAWQ GEMM: qweight int32 [in, out / 8] (AWQ's field order),
                                     qzeros, fp16 scales [in / group, out]
  quant_method "gptq"                AutoGPTQ (checkpoint_format gptq: zeros stored minus one; gptq_v2):
                                     qweight int32 [in / 8, out], qzeros, scales, g_idx (act-order)
  compressed-tensors pack-quantized  weight_packed int32 (+8 offset), weight_scale [out, G],
                                     optional weight_zero_point, weight_shape

A per-tensor or per-channel checkpoint loads as it is: its 8-bit values are our values and its
scale is our per-output-channel scale (a per-tensor scale repeated over the channels), so nothing
is rounded again. Group-wise and block-wise scales do not fit one scale per output channel: those
weights are dequantized (in float32) and quantized again per output channel (a second rounding,
logged); 4-bit weights are served as int8 this way (no int4 matmul here: twice the 4-bit bytes).
Activation scales (`input_scale`, static or dynamic w8a8) are not used: activations stay in the
model dtype (weight-only), which is at least as accurate. Anything else (another quant_method,
other bit widths, asymmetric 8-bit zero points, a compressed-tensors config not yet compressed)
is refused at load, naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from jaxserve.models.errors import ModelLoadError
from jaxserve.models.quantization import QUANTIZED_WEIGHTS, contract_axes

log = logging.getLogger(__name__)

# Tensors beside a quantized weight: its scale (read with it), and what we do not use.
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")
UNUSED_SUFFIXES = (".input_scale", ".weight_zero_point", ".k_scale", ".v_scale", ".output_scale",
                   ".weight_global_scale", ".input_global_scale")
COMPRESSED_TENSORS_FORMATS = {"float-quantized": "fp8", "int-quantized": "int8", "naive-quantized": None,
                              "pack-quantized": "int8"}  # 4-bit, unpacked to int8
# 4-bit packed checkpoints: the tensors of one linear layer, by suffix (`X.qweight` stands for `X.weight`).
INT4_WEIGHT_SUFFIXES = (".qweight", ".weight_packed")
INT4_AUX_SUFFIXES = (".qzeros", ".scales", ".g_idx", ".weight_shape")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What a checkpoint's quantization_config says about its linear weights."""

    method: str  # quantization_config.quant_method: "fp8" | "compressed-tensors" | "awq" | "gptq"
    mode: str  # our quantization of the projections: "int8" | "fp8" (4-bit checkpoints: "int8")
    strategy: str  # "tensor-or-channel" (from each scale's shape) | "group" | "block" | "int4"
    scale_suffix: str = ".weight_scale"  # ".weight_scale_inv" for block-wise fp8
    group_size: int | None = None  # strategy "group": input columns per scale
    block: tuple[int, int] | None = None  # strategy "block": (rows, columns) per scale
    activations: str | None = None  # the checkpoint's activation scheme (not used: weight-only)
    # strategy "int4": how the 4-bit values are packed: "awq" (AutoAWQ GEMM), "gptq" / "gptq_v2"
    # (AutoGPTQ; v1 stores zeros minus one), "pack-quantized" (compressed-tensors)
    packing: str | None = None

    def describe(self) -> str:
        extra = {"group": f", group_size {self.group_size}", "block": f", blocks {self.block}",
                 "int4": f" ({self.packing} packing, group_size {self.group_size})"}.get(self.strategy, "")
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
    if method in ("awq", "gptq"):
        return _int4_scheme(method, qc)
    raise ModelLoadError(f"quantization_config.quant_method {method!r} is not supported; supported: 'fp8', "
                         "'compressed-tensors' (8-bit fp8 / int8 weights; 4-bit pack-quantized), 'awq', 'gptq' "
                         "(4-bit, unpacked to int8 at load)")


def _int4_scheme(method: str, qc: Mapping[str, Any]) -> Scheme:
    """AutoAWQ GEMM / AutoGPTQ checkpoints: 4-bit weights packed in int32 with group scales and zeros."""
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ModelLoadError(f"{method} quantization_config.bits {bits!r} is not supported (4-bit only)")
    size = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(size, int) or not (size > 0 or size == -1):
        raise ModelLoadError(f"{method} quantization_config.group_size must be a positive integer or -1, got {size!r}")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelLoadError(f"awq quantization_config.version {version!r} is not supported (gemm only)")
        return Scheme("awq", "int8", "int4", group_size=size, packing="awq")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ModelLoadError(f"gptq quantization_config.checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    return Scheme("gptq", "int8", "int4", group_size=size, packing=fmt)


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
    if fmt == "pack-quantized":
        pass  # 4-bit, checked below
    elif bits != 8 or kind not in ("int", "float"):
        raise ModelLoadError(f"compressed-tensors weights num_bits={bits!r} type={kind!r} are not supported "
                             "(8-bit int or float)")
    if not first.get("symmetric", True) and fmt != "pack-quantized":
        raise ModelLoadError("compressed-tensors weights symmetric=false (zero points) are not supported")
    if first.get("dynamic"):
        raise ModelLoadError("compressed-tensors weights dynamic=true are not supported")
    mode = "fp8" if kind == "float" else "int8"
    if fmt != "pack-quantized" and COMPRESSED_TENSORS_FORMATS[fmt] not in (None, mode):
        raise ModelLoadError(f"compressed-tensors format {fmt!r} with weights type {kind!r} is inconsistent")
    group = (groups[weights[0][0]] or {})
    acts = group.get("input_activations")
    acts_text = None if not acts else f"{acts.get('type')}{acts.get('num_bits')} {acts.get('strategy')}"
    if fmt == "pack-quantized":
        if bits != 4 or kind != "int" or strategy not in ("group", "channel"):
            raise ModelLoadError(f"compressed-tensors pack-quantized weights num_bits={bits!r} type={kind!r} "
                                 f"strategy={strategy!r} are not supported (4-bit int, group or channel)")
        return Scheme("compressed-tensors", "int8", "int4", group_size=first.get("group_size") or -1,
                      packing="pack-quantized", activations=acts_text)
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


def checkpoint_weight(scheme: Scheme | None, name: str, tensor: np.ndarray, scales: Mapping[str, np.ndarray],
                      transform: Callable[[np.ndarray], np.ndarray], param: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A checkpoint tensor -> (what to transform and store, the scale of its 8-bit values in our
    layout or None). A projection's 8-bit values keep their scale (or come back dequantized, for
    group / block scales); any other 8-bit tensor (an LM head a checkpoint quantized too) comes
    back dequantized in float32, since only the projections are stored in 8 bits."""
    if scheme is None or tensor.dtype not in (np.int8, ml_dtypes.float8_e4m3fn):
        return tensor, None
    values, rows = split_weight(scheme, name, tensor, scales)
    if rows is None:
        return values, None
    if not is_projection_weight(name):
        return values.astype(np.float32) * rows[:, None], None
    return values, scale_in_layout(transform, rows, tensor.shape, contract_axes(param, 2))


def scale_in_layout(transform: Callable[[np.ndarray], np.ndarray], rows_scale: np.ndarray,
                    shape: tuple[int, int], contract: tuple[int, ...]) -> np.ndarray:
    """A per-output-row scale [out] -> our scale layout: the weight's layout (`transform` of the HF
    [out, in] tensor) with size 1 on the contracted axes."""
    full = transform(np.broadcast_to(rows_scale[:, None], shape))
    return np.ascontiguousarray(full[tuple(slice(0, 1) if i in contract else slice(None)
                                           for i in range(full.ndim))], np.float32)


def collect_int4_aux(tensors: Iterable[tuple[str, Callable[[], np.ndarray]]]) -> dict[str, np.ndarray]:
    """First pass over a 4-bit checkpoint: every group scale, zero point, g_idx and shape tensor."""
    suffixes = INT4_AUX_SUFFIXES + (".weight_scale", ".weight_zero_point")
    return {name: np.asarray(read()) for name, read in tensors if name.endswith(suffixes)}


def unpack_int4(scheme: Scheme, tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
                aux: Mapping[str, np.ndarray]) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(name, loader) pairs with every packed 4-bit weight `X.qweight` / `X.weight_packed` replaced
    by `X.weight`, its dequantized float32 [out, in] (which the loader quantizes per output channel
    to int8, like any float weight), and the packing's other tensors dropped."""
    suffixes = INT4_AUX_SUFFIXES + (".weight_scale", ".weight_zero_point")
    for name, read in tensors:
        if name.endswith(INT4_WEIGHT_SUFFIXES):
            prefix = name.rsplit(".", 1)[0]
            yield prefix + ".weight", (lambda read=read, prefix=prefix: dequantize_int4(scheme, prefix, read(), aux))
        elif not name.endswith(suffixes):
            yield name, read


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """int32 [..., n] -> its 4-bit fields, low bits first, int32 [..., 8n]."""
    words = np.ascontiguousarray(packed).view(np.uint32)[..., None] >> np.arange(0, 32, 4, dtype=np.uint32)
    return (words & 0xF).astype(np.int32).reshape(*packed.shape[:-1], -1)


def _need(aux: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in aux:
        raise ModelLoadError(f"the 4-bit checkpoint has no {name!r}")
    return aux[name]


def dequantize_int4(scheme: Scheme, prefix: str, packed: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
    """One packed 4-bit weight -> float32 [out, in] = (q - zero) * scale, group by group."""
    scales = _need(aux, prefix + (".weight_scale" if scheme.packing == "pack-quantized" else ".scales"))
    scales = scales.astype(np.float32)
    if scheme.packing == "pack-quantized":  # [out, in / 8] sequential fields, +8 offset; scales [out, G]
        out, cols = (int(x) for x in _need(aux, prefix + ".weight_shape"))
        q = _nibbles(packed)[:, :cols] - 8
        zp = aux.get(prefix + ".weight_zero_point")  # packed along the output rows: [out / 8, G]
        zeros = np.zeros_like(scales) if zp is None else (_nibbles(np.ascontiguousarray(zp.T))[:, :out] - 8).T
        group = np.arange(cols) // (cols if scheme.group_size == -1 else scheme.group_size)
        return (q - zeros[:, group]) * scales[:, group]
    if scheme.packing == "awq":  # qweight [in, out / 8] in AutoAWQ's field order; qzeros [G, out / 8]
        order = np.arange(packed.shape[1] * 8).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
        q = _nibbles(packed)[:, order]  # [in, out]
        qz = aux.get(prefix + ".qzeros")
        zeros = np.full(scales.shape, 8, np.int32) if qz is None else _nibbles(qz)[:, order]
        rows = q.shape[0]
        group = np.arange(rows) // (rows if scheme.group_size == -1 else scheme.group_size)
    else:  # gptq: qweight [in / 8, out] packed along the input rows; qzeros [G, out / 8]; g_idx [in]
        q = _nibbles(np.ascontiguousarray(packed.T)).T  # [in, out]
        zeros = _nibbles(_need(aux, prefix + ".qzeros")) + (1 if scheme.packing == "gptq" else 0)
        rows = q.shape[0]
        g_idx = aux.get(prefix + ".g_idx")
        group = (np.asarray(g_idx, np.int64) if g_idx is not None
                 else np.arange(rows) // (rows if scheme.group_size == -1 else scheme.group_size))
    if group.max() >= scales.shape[0]:
        raise ModelLoadError(f"{prefix}: {scales.shape[0]} groups of scales for group index {group.max()}")
    return np.ascontiguousarray(((q - zeros[group]) * scales[group]).T, np.float32)


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
    if scheme.strategy == "int4":
        log.warning("4-bit %s weights (group_size %d) are unpacked and quantized again per output channel to int8 "
                    "at load: served as int8 (twice their 4-bit bytes)", scheme.packing, scheme.group_size)
    elif scheme.strategy in ("group", "block"):
        log.warning("the checkpoint's %s-wise weight scales are dequantized and quantized again per output channel "
                    "to %s at load (one more rounding)", scheme.strategy, scheme.mode)
    if unused:
        log.info("%d activation / KV / zero-point quantization tensors of the checkpoint are not used", unused)
