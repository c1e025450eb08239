"""The engine with quantized weights (quantization int8 / fp8, models.quantize_weights).

Oracle: transformers' Llama (float32) whose projection weights are quantized per output channel
with models.quantization.quantize in the HF [out, in] layout and dequantized with numpy (and, for
w8a8, whose projection inputs are fake-quantized per token by numpy pre-hooks;
tests/models/quant_fixtures.py): a mixed concurrent workload gives its greedy tokens, and the
logprobs of the top tokens agree within 1e-3. Also: nothing compiles after warm-up, and stats()
reports the weight bytes on the device, which the shapes fix exactly.
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import pytest
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[2] / "models"))

from engine_fixtures import GREEDY, hf_greedy, write_engine_test_model  # noqa: E402
from quant_fixtures import hf_fake_quantized  # noqa: E402
from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.models.loader import load_model  # noqa: E402
from jaxserve.models.quantize_weights import param_bytes  # noqa: E402

CPU = Path(__file__).parents[3] / "configs" / "cpu.yaml"
V, D, F, L, N, K, H = 1024, 64, 128, 2, 4, 2, 16  # the engine test model's shapes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wq-model")
    model, _ = write_engine_test_model(path)
    return path, model


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(6, 1000) for _ in range(rng.choice([1, 4, 17, 30, 64]))], rng.randrange(1, 16))
            for _ in range(n)]


def expected_weight_bytes(value_bytes: int, float_bytes: int) -> int:
    """Bytes of every parameter: projections at value_bytes each plus float32 scales per output
    channel; embeddings, LM head and norms at float_bytes."""
    proj = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    scales = L * (N * H + 2 * K * H + D + 2 * F + D) if value_bytes < float_bytes else 0
    rest = 2 * V * D + D + 2 * L * D
    return proj * value_bytes + scales * 4 + rest * float_bytes


@pytest.mark.parametrize("mode,w8a8", [("int8", False), ("fp8", False), ("int8", True)])
def test_quantized_engine_equals_transformers_on_dequantized_weights(model_dir, mode, w8a8, caplog):
    """w8a8 (activation_quantization): the reference also quantizes each projection's input per token."""
    path, hf = model_dir
    with caplog.at_level(logging.INFO, logger="jaxserve.engine.llm_engine"):
        llm = LLM(str(path), config=CPU, dtype="float32", quantization=mode, activation_quantization=w8a8,
                  token_buckets=[128], seq_buckets=[16])
    assert f"weights (quantization={mode}{', w8a8 activations' if w8a8 else ''})" in caplog.text
    ref = hf_fake_quantized(hf, mode, activations=w8a8)
    work = workload(16, seed=len(mode))
    outs = llm.generate([p for p, _ in work], [SamplingParams(max_tokens=m, **GREEDY) for _, m in work],
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(ref, p, m) for p, m in work]
    prompt = work[3][0]
    out = llm.generate([prompt], SamplingParams(max_tokens=6, logprobs=5, **GREEDY), use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1].double()
        plain = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1].double()
    oracle = torch.log_softmax(logits, dim=-1).numpy()
    unquantized = torch.log_softmax(plain, dim=-1).numpy()
    far = 0.0  # how far the engine is from the unquantized model: the check below can tell them apart
    for row, plain_row, entry in zip(oracle, unquantized, out.logprobs):
        for token, lp in entry.items():
            assert abs(lp.logprob - row[token]) <= 1e-3 * max(1.0, abs(row[token])), (token, lp.logprob, row[token])
            far = max(far, abs(lp.logprob - plain_row[token]) / max(1.0, abs(plain_row[token])))
    assert far > 3e-3
    stats = llm.stats()
    assert stats["compile_count"] == len(llm.engine.runner.shapes_to_compile())  # none after warm-up
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert stats["weight_bytes"] == stats["weight_bytes_per_device"] == expected_weight_bytes(1, 4)


def test_8bit_weight_bytes_are_about_half_of_bfloat16(model_dir):
    """From stats() of bf16 engines (fp8 from the loader: the same count, one engine less)."""
    path, _ = model_dir
    sizes = {q: LLM(str(path), config=CPU, dtype="bfloat16", quantization=q, token_buckets=[128],
                    seq_buckets=[16]).stats()["weight_bytes"] for q in (None, "int8")}
    sizes["fp8"] = param_bytes(nnx.state(load_model(path, dtype="bfloat16", quantization="fp8").model, nnx.Param))[0]
    assert sizes[None] == expected_weight_bytes(2, 2)
    assert sizes["int8"] == sizes["fp8"] == expected_weight_bytes(1, 2)
    proj = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    # the projections halve; their scales (one float32 per output channel) add ~3% of them here
    assert sizes[None] - sizes["int8"] == proj - 4 * L * (N * H + 2 * K * H + D + 2 * F + D)
    assert 0.45 < (sizes["int8"] - 2 * (2 * V * D + D + 2 * L * D)) / (2 * proj) < 0.56


def test_a_prequantized_checkpoint_serves_without_the_flag(model_dir, tmp_path):
    """compressed-tensors FP8 (per channel, dynamic activations), written by the package's own
    compressor: LLM(path) reads quantization_config and serves it as fp8, tokens equal to
    transformers on the package's decompressed weights."""
    import shutil

    from compressed_tensors.quantization import preset_name_to_scheme
    from test_prequantized import _compressed, reference, write_checkpoint

    path, hf = model_dir
    config, one = _compressed(preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]), "float-quantized")
    deq = write_checkpoint(path, hf, tmp_path / "fp8", config, one)
    for f in path.iterdir():  # the tokenizer files
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, tmp_path / "fp8" / f.name)
    llm = LLM(str(tmp_path / "fp8"), config=CPU, dtype="float32", token_buckets=[128], seq_buckets=[16])
    assert llm.engine.model_config.quantization == "fp8"
    ref = reference(hf, deq)
    work = workload(8, seed=5)
    outs = llm.generate([p for p, _ in work], [SamplingParams(max_tokens=m, **GREEDY) for _, m in work],
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(ref, p, m) for p, m in work]
    assert llm.stats()["weight_bytes"] == expected_weight_bytes(1, 4)
