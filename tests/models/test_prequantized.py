"""Pre-quantized checkpoints (models.prequantized), written here from a random Llama by each format's
conventions: HF `fp8` (e4m3 `weight` + `weight_scale` per tensor or per channel, or block-wise
`weight_scale_inv`) and compressed-tensors (its own package's schemes and compressor quantize the
weights; its decompressor is the reference). Each loads with the greedy tokens and logits of
transformers on the dequantized weights; per-tensor / per-channel values are stored exactly as the
checkpoint has them. Unsupported quantization_configs are refused by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from compressed_tensors.compressors import NaiveQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, \
    preset_name_to_scheme
from flax import nnx
from safetensors.torch import save_file

from quant_fixtures import PROJECTIONS, hf_fake_quantized
from jaxserve.models.config import ModelLoadError
from jaxserve.models.loader import load_model
from jaxserve.models.single_sequence import SingleSequenceRunner

PROMPTS = [[5, 17, 3, 44], [90, 12, 7, 61, 2, 33, 8]]
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def _projections(model):
    return {n: p.detach().float() for n, p in model.state_dict().items()
            if ".layers." in n and n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS}


def write_checkpoint(src, hf, dst, quantization_config: dict, quantize_one) -> dict[str, torch.Tensor]:
    """The HF model saved to dst with each projection weight W [out, in] replaced by the tensors
    quantize_one(W) gives ({"weight": 8-bit, "weight_scale": ...}); returns {name: W dequantized}."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    tensors = {n: p.detach().clone().contiguous() for n, p in hf.state_dict().items()}
    deq = {}
    for name, w in _projections(hf).items():
        del tensors[name]
        prefix = name[:-len("weight")]
        parts, deq[name] = quantize_one(w)
        tensors.update({prefix + k: v.contiguous() for k, v in parts.items()})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return deq


def reference(hf, deq: dict[str, torch.Tensor], requantized_as: str | None = None):
    """transformers in float32 on the dequantized weights (quantized again per channel, like the
    loader does for group / block scales, when requantized_as is set)."""
    ref = hf_fake_quantized(hf, "int8")  # a float32 copy; its projections are overwritten next
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name, w in deq.items():
            params[name].copy_(w)
    return hf_fake_quantized(ref, requantized_as) if requantized_as else ref


def check_equal(dst, ref, exact_deq: dict[str, torch.Tensor] | None = None):
    loaded = load_model(dst)
    runner = SingleSequenceRunner(loaded.model, max_len=32)
    for prompt in PROMPTS:
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
        assert runner.greedy(prompt, 10) == want
        with torch.no_grad():
            want_logits = ref(torch.tensor([prompt + want])).logits[0].numpy()
        got = SingleSequenceRunner(loaded.model, max_len=32).full_logits(prompt + want)
        np.testing.assert_allclose(got, want_logits, rtol=1e-3, atol=1e-3 * np.abs(want_logits).max())
    if exact_deq is not None:  # stored as the checkpoint has them: values * scale is the dequantized weight
        attn = nnx.state(loaded.model)["layers"]["self_attn"]
        q = np.asarray(attn["q_proj"].get_value()[1]).astype(np.float32)
        s = np.asarray(attn["q_proj_scale"].get_value()[1])
        w = exact_deq["model.layers.1.self_attn.q_proj.weight"].numpy()  # [N*H, D]
        np.testing.assert_array_equal(q * s, w.T.reshape(q.shape))
    return loaded


def _fp8_rows(w, per_tensor: bool):
    amax = w.abs().max() if per_tensor else w.abs().amax(dim=1, keepdim=True)
    scale = (amax / 448.0).float()
    q = (w / scale).to(torch.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("per_tensor", [True, False])
def test_hf_fp8_checkpoint(hf_model_dir, tmp_path, per_tensor):
    src, hf = hf_model_dir("llama3")

    def one(w):
        q, scale = _fp8_rows(w, per_tensor)
        parts = {"weight": q, "weight_scale": scale.reshape(()) if per_tensor else scale.reshape(-1),
                 "input_scale": torch.tensor(0.02)}
        return parts, q.float() * scale

    deq = write_checkpoint(src, hf, tmp_path / "fp8", {"quant_method": "fp8", "activation_scheme": "static"}, one)
    loaded = check_equal(tmp_path / "fp8", reference(hf, deq), exact_deq=deq)
    assert loaded.config.quantization == "fp8"


def test_hf_fp8_block_checkpoint_is_requantized_per_channel(hf_model_dir, tmp_path, caplog):
    src, hf = hf_model_dir("llama3")

    def one(w):  # DeepSeek-style 16x16 blocks: w ~= q * weight_scale_inv[block]
        blocks = w.reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16)
        scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).float()
        full = scale.repeat_interleave(16, 0).repeat_interleave(16, 1)
        q = (w / full).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale_inv": scale}, q.float() * full

    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [16, 16]}
    deq = write_checkpoint(src, hf, tmp_path / "blocks", config, one)
    check_equal(tmp_path / "blocks", reference(hf, deq, requantized_as="fp8"))
    assert "quantized again per output channel" in caplog.text


def _compressed(scheme: QuantizationScheme, fmt: str):
    """quantize_one by compressed-tensors' own compressor (scales: absmax per channel / group /
    tensor); the reference weight is its own decompressor's."""
    args = scheme.weights
    dtype = args.pytorch_dtype()

    def one(w):
        if args.strategy == "tensor":
            amax = w.abs().max().reshape(1)
        elif args.strategy == "channel":
            amax = w.abs().amax(dim=1, keepdim=True)
        else:
            amax = w.abs().reshape(w.shape[0], -1, args.group_size).amax(dim=2)
        state = {"weight": w, "weight_scale": (amax / QMAX[dtype]).float()}
        packed = NaiveQuantizationCompressor.compress(state, scheme)
        assert packed["weight"].dtype == dtype
        back = NaiveQuantizationCompressor.decompress(dict(packed), scheme)["weight"].float()
        return {k: v for k, v in packed.items()}, back

    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                                ignore=["lm_head"]).model_dump()
    return config, one


@pytest.mark.parametrize("preset,fmt", [("FP8_DYNAMIC", "float-quantized"), ("FP8", "float-quantized"),
                                        ("W8A8", "int-quantized"), ("W8A16-channel", "naive-quantized")])
def test_compressed_tensors_checkpoint(hf_model_dir, tmp_path, preset, fmt):
    src, hf = hf_model_dir("llama3")
    if preset == "W8A16-channel":  # int8 weights per channel, activations unquantized
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="channel"))
    else:
        scheme = preset_name_to_scheme(preset, ["Linear"])
    config, one = _compressed(scheme, fmt)
    deq = write_checkpoint(src, hf, tmp_path / "ct", config, one)
    loaded = check_equal(tmp_path / "ct", reference(hf, deq), exact_deq=deq)
    assert loaded.config.quantization == ("fp8" if "FP8" in preset else "int8")


def test_compressed_tensors_group_scales_are_requantized_per_channel(hf_model_dir, tmp_path):
    src, hf = hf_model_dir("llama3")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=8, type="int", symmetric=True, strategy="group", group_size=32))
    config, one = _compressed(scheme, "naive-quantized")
    deq = write_checkpoint(src, hf, tmp_path / "groups", config, one)
    check_equal(tmp_path / "groups", reference(hf, deq, requantized_as="int8"))


@pytest.mark.parametrize("qconfig,match", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {}},
     "format 'nvfp4-pack-quantized' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"}}}},
     "symmetric=false"),
    ({"quant_method": "compressed-tensors", "format": "naive-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}},
     "num_bits=4"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2'"),
])
def test_unsupported_quantization_config_is_refused_by_name(hf_model_dir, tmp_path, qconfig, match):
    src, _ = hf_model_dir("llama3")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))
    with pytest.raises(ModelLoadError, match=match):
        load_model(dst)


def test_a_conflicting_quantization_is_refused(hf_model_dir, tmp_path):
    src, hf = hf_model_dir("llama3")
    deq = write_checkpoint(src, hf, tmp_path / "fp8", {"quant_method": "fp8"},
                           lambda w: ({"weight": _fp8_rows(w, False)[0], "weight_scale": _fp8_rows(w, False)[1]},
                                      None))
    assert deq
    with pytest.raises(ValueError, match="quantization='int8', but .* is a pre-quantized checkpoint"):
        load_model(tmp_path / "fp8", quantization="int8")
    assert load_model(tmp_path / "fp8", quantization="fp8").config.quantization == "fp8"


def test_a_prequantized_mixture_of_experts_is_refused(tmp_path):
    from moe_fixtures import save_hf_moe

    save_hf_moe("mixtral", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match="pre-quantized mixture-of-experts checkpoints are not supported"):
        load_model(tmp_path)
