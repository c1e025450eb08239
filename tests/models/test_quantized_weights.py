"""Weight quantization at load (quantization int8 / fp8): the parameters the loader stores, the
quantized matmul, logits against transformers on the dequantized weights, Orbax, and refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from quant_fixtures import hf_fake_quantized
from jaxserve.config import EngineConfig
from jaxserve.entrypoints.cli import build_parser, serve_config
from jaxserve.models.loader import load_model
from jaxserve.models.orbax_checkpoint import convert
from jaxserve.models.quantization import linear, quantize
from jaxserve.models.single_sequence import SingleSequenceRunner

IDS = [5, 17, 3, 44, 90, 12, 7, 61, 2, 33]
QMAX = {"int8": 127.0, "fp8": 448.0}


def np_quantize(w: np.ndarray, axes: tuple[int, ...], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The numpy oracle: symmetric absmax per output channel, int8 rounded or e4m3 (ml_dtypes)."""
    amax = np.abs(w).max(axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax * np.float32(1 / QMAX[mode]), 1).astype(np.float32)
    y = np.clip(w / scale, -QMAX[mode], QMAX[mode])
    q = np.rint(y).astype(np.int8) if mode == "int8" else y.astype(ml_dtypes.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("eq,shape,axes", [
    ("td,dnh->tnh", (16, 4, 8), (0,)), ("tnh,nhd->td", (4, 8, 16), (0, 1)), ("td,df->tf", (16, 24), (0,))])
def test_linear_equals_the_matmul_of_the_dequantized_weight(mode, eq, shape, axes):
    rng = np.random.default_rng(1)
    w = rng.normal(size=shape).astype(np.float32)
    q, scale = quantize(w, axes, mode)
    nq, nscale = np_quantize(w, axes, mode)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), nq.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(scale), nscale)
    x = rng.normal(size=(5, *shape[:len(axes)])).astype(np.float32)
    want = np.einsum(eq, x, nq.astype(np.float32) * nscale)
    np.testing.assert_allclose(np.asarray(linear(eq, jnp.asarray(x), q, scale)), want, rtol=1e-5, atol=1e-5)
    got16 = linear(eq, jnp.asarray(x, jnp.bfloat16), q, scale)
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got16, np.float32), want, rtol=0.05, atol=0.05 * np.abs(want).max())


def _hf_rows(model, layer: int, name: str) -> np.ndarray:
    group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return getattr(getattr(model.model.layers[layer], group), name).weight.detach().numpy()


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_loader_stores_8bit_projections_with_per_channel_scales(hf_model_dir, mode):
    path, hf = hf_model_dir("llama3")
    loaded = load_model(path, quantization=mode)
    assert loaded.config.quantization == mode
    layers = nnx.state(loaded.model)["layers"]
    attn, mlp = layers["self_attn"], layers["mlp"]
    n, k, h, d, f = 4, 2, 16, 64, 96
    want = {  # name: (values shape [L, ...], scale shape, scale logical axes, HF [out, in] -> ours)
        "q_proj": (attn, (2, 1, n, h), ("layers", None, "heads", "head_dim"), lambda w: w.T.reshape(d, n, h)),
        "k_proj": (attn, (2, 1, k, h), ("layers", None, "kv_heads", "head_dim"), lambda w: w.T.reshape(d, k, h)),
        "o_proj": (attn, (2, 1, 1, d), ("layers", None, None, "embed"), lambda w: w.T.reshape(n, h, d)),
        "gate_proj": (mlp, (2, 1, f), ("layers", None, "mlp"), lambda w: w.T),
        "down_proj": (mlp, (2, 1, d), ("layers", None, "embed"), lambda w: w.T),
    }
    for name, (group, scale_shape, scale_axes, layout) in want.items():
        values, scale = group[name].get_value(), group[name + "_scale"]
        assert values.dtype == (jnp.int8 if mode == "int8" else jnp.float8_e4m3fn), name
        assert scale.get_value().shape == scale_shape and scale.get_value().dtype == jnp.float32, name
        assert tuple(scale.get_metadata()["out_sharding"]) == scale_axes, name
        assert group[name].get_metadata()["out_sharding"][0] == "layers"
        for layer in range(2):
            ours = layout(_hf_rows(hf, layer, name))
            nq, nscale = np_quantize(ours, (0, 1) if name == "o_proj" else (0,), mode)
            np.testing.assert_array_equal(np.asarray(values[layer]).astype(np.float32), nq.astype(np.float32))
            np.testing.assert_array_equal(np.asarray(scale.get_value()[layer]), nscale)
    assert nnx.state(loaded.model)["embed_tokens"].get_value().dtype == jnp.float32  # not quantized


# make test: every architecture once and both modes (int8 on two); the other three pairs are slow.
@pytest.mark.parametrize("arch,mode", [
    pytest.param(arch, mode, id=f"{mode}-{arch}",
                 marks=[] if (arch, mode) in {("llama3", "int8"), ("llama2_bias", "fp8"), ("qwen3", "int8")}
                 else [pytest.mark.slow])
    for mode in ("int8", "fp8") for arch in ("llama3", "llama2_bias", "qwen3")])
def test_quantized_logits_equal_transformers_on_the_dequantized_weights(hf_model_dir, arch, mode):
    path, hf = hf_model_dir(arch)
    model = load_model(path, quantization=mode).model
    got = SingleSequenceRunner(model, max_len=32).full_logits(IDS)
    with torch.no_grad():
        want = hf_fake_quantized(hf, mode)(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    plain = SingleSequenceRunner(load_model(path).model, max_len=32).full_logits(IDS)
    assert np.abs(plain - got).max() > 1e-4  # the quantization is not a no-op


def test_orbax_checkpoint_is_quantized_on_restore(hf_model_dir, tmp_path):
    src, _ = hf_model_dir("llama3")
    dst = convert(str(src), tmp_path / "converted")
    from_hf = nnx.to_flat_state(nnx.state(load_model(src, quantization="int8").model))
    from_orbax = dict(nnx.to_flat_state(nnx.state(load_model(dst, quantization="int8").model)))
    assert len(from_hf) == len(from_orbax)
    for path, var in from_hf:
        a, b = var.get_value(), from_orbax[path].get_value()
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32))


@pytest.mark.parametrize("arch,mode", [("mixtral", "int8"), ("qwen2_moe", "fp8")])
def test_mixture_of_experts_quantized_logits_equal_transformers(tmp_path, arch, mode):
    """Expert weights quantized per expert and output channel (Qwen2-MoE: and its shared expert)."""
    from moe_fixtures import save_hf_moe

    hf = save_hf_moe(arch, tmp_path)
    loaded = load_model(tmp_path, quantization=mode)
    mlp = nnx.state(loaded.model)["layers"]["mlp"]
    e, f = hf.config.num_local_experts if arch == "mixtral" else hf.config.num_experts, \
        hf.config.intermediate_size if arch == "mixtral" else hf.config.moe_intermediate_size
    assert mlp["gate_up_proj_scale"].get_value().shape == (2, e, 1, 2 * f)
    assert tuple(mlp["gate_up_proj_scale"].get_metadata()["out_sharding"]) == ("layers", "expert", None, "expert_mlp")
    assert mlp["down_proj"].get_value().dtype == (jnp.int8 if mode == "int8" else jnp.float8_e4m3fn)
    got = SingleSequenceRunner(loaded.model, max_len=32).full_logits(IDS)
    with torch.no_grad():
        want = hf_fake_quantized(hf, mode)(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_engine_config_field_yaml_and_flags(tmp_path):
    assert EngineConfig().quantization is None
    assert EngineConfig(quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match="quantization must be one of int8, fp8"):
        EngineConfig(quantization="awq")
    (tmp_path / "q.yaml").write_text("engine:\n  quantization: int8\n")
    assert EngineConfig.load(tmp_path / "q.yaml").quantization == "int8"
    for argv in (["--quantization", "int8"], ["-q", "int8"]):
        assert serve_config(build_parser().parse_args(["serve", *argv])).quantization == "int8"
    assert serve_config(build_parser().parse_args(["serve"])).quantization is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "-q", "int4"])


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("eq,shape,axes", [("td,dnh->tnh", (16, 4, 8), (0,)), ("tnh,nhd->td", (4, 8, 16), (0, 1))])
def test_w8a8_linear_equals_numpy_on_per_token_quantized_inputs(mode, eq, shape, axes):
    rng = np.random.default_rng(2)
    w = rng.normal(size=shape).astype(np.float32)
    x = (rng.normal(size=(5, *shape[:len(axes)])) * rng.uniform(0.1, 10, size=(5,) + (1,) * len(axes)))
    x = x.astype(np.float32)
    q, scale = quantize(w, axes, mode)
    nq, nscale = np_quantize(w, axes, mode)
    xq, xscale = np_quantize(x, tuple(range(1, 1 + len(axes))), mode)  # one scale per token
    want = np.einsum(eq, xq.astype(np.float64), nq.astype(np.float64))
    want = want * xscale.reshape(5, *([1] * (want.ndim - 1))) * nscale.reshape(want.shape[1:])
    got = np.asarray(linear(eq, jnp.asarray(x), q, scale, w8a8=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_w8a8_logits_equal_transformers_with_per_token_activation_quantization(hf_model_dir, mode):
    path, hf = hf_model_dir("llama3")
    model = load_model(path, quantization=mode, activation_quantization=True).model
    got = SingleSequenceRunner(model, max_len=32).full_logits(IDS)
    with torch.no_grad():
        want = hf_fake_quantized(hf, mode, activations=True)(torch.tensor([IDS])).logits[0].numpy()
        weight_only = hf_fake_quantized(hf, mode)(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert np.abs(weight_only - got).max() > 1e-2 * np.abs(want).max()  # the activations really were rounded


def test_w8a8_needs_quantized_weights(hf_model_dir):
    path, _ = hf_model_dir("llama3")
    with pytest.raises(ValueError, match="activation_quantization .* needs quantized weights"):
        load_model(path, activation_quantization=True)
    with pytest.raises(ValueError, match="activation_quantization must be true or false"):
        EngineConfig(activation_quantization="yes")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_activations_run_at_engine_shapes(dtype):
    """XLA:CPU refuses a bf16 x bf16 -> f32 dot at some shapes (128 tokens x 64 -> 128 did):
    linear keeps 16-bit dots in their own dtype and scales in float32."""
    rng = np.random.default_rng(3)
    for eq, shape, axes in [("td,dnh->tnh", (64, 4, 16), (0,)), ("tnh,nhd->td", (4, 16, 64), (0, 1)),
                            ("td,df->tf", (64, 128), (0,)), ("tf,fd->td", (128, 64), (0,))]:
        w = rng.normal(size=shape).astype(np.float32)
        q, scale = quantize(w, axes, "int8")
        x = rng.normal(size=(128, *shape[:len(axes)])).astype(np.float32)
        got = jax.jit(lambda x: linear(eq, x, q, scale))(jnp.asarray(x, dtype))
        want = np.einsum(eq, x, np.asarray(q, np.float32) * np.asarray(scale))
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=0.02 * np.abs(want).max())
