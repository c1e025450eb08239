"""4-bit checkpoints (AutoAWQ GEMM, AutoGPTQ, compressed-tensors pack-quantized), written here from a
random Llama: unpacked at load, dequantized group by group and quantized again per output channel to
int8 (logged). Oracle: transformers on the same group-dequantized weights, quantized per channel by
quant_fixtures.hf_fake_quantized. The AWQ reference unpacks through compressed-tensors' own AutoAWQ
converter and decompressor (the package that converts AWQ checkpoints for vLLM), so it shares no code
with the loader; the GPTQ reference is the integer matrices before packing."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
from flax import nnx
from safetensors.torch import save_file

from test_prequantized import _projections, check_equal, reference

GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM's order of 8 columns inside one int32


def pack_columns(v: np.ndarray, order=range(8)) -> np.ndarray:
    """int [R, C] (4-bit values) -> int32 [R, C / 8]: field i of word k holds column 8k + order[i]."""
    v = v.astype(np.uint32).reshape(v.shape[0], -1, 8)[:, :, list(order)]
    return (v << (4 * np.arange(8, dtype=np.uint32))).sum(axis=2, dtype=np.uint32).view(np.int32)


def asym_groups(wt: np.ndarray, group: int):
    """W^T [in, out] -> AWQ-style asymmetric 4-bit groups along `in`: q, zeros [G, out], scales fp16 [G, out]."""
    g = wt.reshape(-1, group, wt.shape[1])
    lo, hi = g.min(axis=1), g.max(axis=1)
    scales = ((hi - lo) / 15).astype(np.float16)
    s = scales.astype(np.float32)
    zeros = np.clip(np.rint(-lo / s), 0, 15).astype(np.int32)
    q = np.clip(np.rint(g / s[:, None]) + zeros[:, None], 0, 15).astype(np.int32).reshape(wt.shape)
    return q, zeros, scales


def write(src, hf, dst, qconfig, tensors_of):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))
    tensors = {n: p.detach().clone().contiguous() for n, p in hf.state_dict().items()}
    deq = {}
    for name, w in _projections(hf).items():
        del tensors[name]
        parts, deq[name] = tensors_of(name[:-len(".weight")], w.numpy())
        tensors.update({k: v.contiguous() for k, v in parts.items()})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return deq


def awq_tensors(prefix: str, w: np.ndarray):
    q, zeros, scales = asym_groups(np.ascontiguousarray(w.T), GROUP)
    parts = {prefix + ".qweight": torch.from_numpy(pack_columns(q, AWQ_ORDER)),
             prefix + ".qzeros": torch.from_numpy(pack_columns(zeros, AWQ_ORDER)),
             prefix + ".scales": torch.from_numpy(scales)}
    # the reference: compressed-tensors' AutoAWQ converter, then its pack-quantized decompressor
    converter = AutoAWQConverter(bits=4, group_size=GROUP, zero_point=True)
    packed = converter.process(dict(parts))
    scheme = converter._build_quant_config().config_groups["config_group_0"]
    state = {k.rsplit(".", 1)[1]: v for k, v in packed.items()}
    state["weight_scale"] = state["weight_scale"].float()  # dequantize in float32, as the loader does, not fp16
    back = PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()
    return parts, back


def test_awq_checkpoint_is_unpacked_to_int8(hf_model_dir, tmp_path, caplog):
    src, hf = hf_model_dir("llama3")
    qconfig = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    deq = write(src, hf, tmp_path / "awq", qconfig, awq_tensors)
    with caplog.at_level(logging.INFO):
        loaded = check_equal(tmp_path / "awq", reference(hf, deq, requantized_as="int8"))
    assert "4-bit awq weights (group_size 32) are unpacked and quantized again per output channel to int8" \
        in caplog.text
    assert loaded.config.quantization == "int8"
    assert nnx.state(loaded.model)["layers"]["mlp"]["down_proj"].get_value().dtype == np.int8


def test_compressed_tensors_pack_quantized_checkpoint(hf_model_dir, tmp_path):
    """What compressed-tensors' AutoAWQ converter writes (W4A16 with zero points, pack-quantized)."""
    src, hf = hf_model_dir("llama3")
    converter = AutoAWQConverter(bits=4, group_size=GROUP, zero_point=True)

    def tensors_of(prefix, w):
        parts, back = awq_tensors(prefix, w)
        return converter.process(parts), back

    deq = write(src, hf, tmp_path / "ct4", converter._build_quant_config().model_dump(), tensors_of)
    check_equal(tmp_path / "ct4", reference(hf, deq, requantized_as="int8"))


@pytest.mark.parametrize("fmt,desc_act", [("gptq", False), ("gptq", True), ("gptq_v2", False)])
def test_gptq_checkpoint_is_unpacked_to_int8(hf_model_dir, tmp_path, fmt, desc_act):
    src, hf = hf_model_dir("llama3")
    rng = np.random.default_rng(0)

    def tensors_of(prefix, w):
        wt = np.ascontiguousarray(w.T)  # [in, out]
        rows = wt.shape[0]
        g_idx = np.arange(rows) // GROUP
        if desc_act:  # act-order: groups assigned to a permutation of the input rows
            g_idx = g_idx[rng.permutation(rows)]
        order = np.argsort(g_idx, kind="stable")
        q = np.empty(wt.shape, np.int32)
        s = np.empty((rows // GROUP, wt.shape[1]), np.float16)
        for g in range(rows // GROUP):  # symmetric: zero 8
            members = order[g * GROUP:(g + 1) * GROUP]
            s[g] = (np.abs(wt[members]).max(axis=0) / 7).astype(np.float16)
            q[members] = np.clip(np.rint(wt[members] / s[g].astype(np.float32)) + 8, 0, 15)
        zeros = np.full(s.shape, 8, np.int32)
        stored_zeros = zeros - 1 if fmt == "gptq" else zeros  # v1 stores zero - 1
        parts = {prefix + ".qweight": torch.from_numpy(pack_columns(np.ascontiguousarray(q.T)).T.copy()),
                 prefix + ".qzeros": torch.from_numpy(pack_columns(stored_zeros)),
                 prefix + ".scales": torch.from_numpy(s), prefix + ".g_idx": torch.from_numpy(g_idx.astype(np.int32))}
        back = (q - zeros[g_idx]) * s.astype(np.float32)[g_idx]  # [in, out]
        return parts, torch.from_numpy(np.ascontiguousarray(back.T))

    qconfig = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": desc_act, "sym": True,
               "checkpoint_format": fmt}
    deq = write(src, hf, tmp_path / "gptq", qconfig, tensors_of)
    check_equal(tmp_path / "gptq", reference(hf, deq, requantized_as="int8"))


def test_unsupported_4bit_configs_are_refused():
    from jaxserve.models.config import ModelLoadError
    from jaxserve.models.prequantized import read_scheme

    with pytest.raises(ModelLoadError, match="bits 3"):
        read_scheme({"quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 128}})
    with pytest.raises(ModelLoadError, match="version 'gemv'"):
        read_scheme({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemv"}})
    with pytest.raises(ModelLoadError, match="checkpoint_format 'marlin'"):
        read_scheme({"quantization_config": {"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}})
