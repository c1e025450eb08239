"""Our Flax decoder against Hugging Face transformers (PyTorch) on the same random weights."""

import dataclasses

import numpy as np
import pytest
import torch

from hf_fixtures import ARCHS
from jaxserve.models.loader import load_model
from jaxserve.models.single_sequence import SingleSequenceRunner

PROMPT_LENGTHS = (1, 7, 20, 45)


def prompt(length: int, seed: int = 0) -> list[int]:
    return np.random.RandomState(seed + length).randint(3, 97, size=length).tolist()


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_match_transformers(arch, hf_model_dir):
    path, hf = hf_model_dir(arch)
    runner = SingleSequenceRunner(load_model(path).model, max_len=64)
    for length in PROMPT_LENGTHS:
        ids = prompt(length)
        assert rel_err(runner.full_logits(ids), hf_logits(hf, ids)) < 1e-4, (arch, length)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_tokens_match_transformers(arch, hf_model_dir):
    path, hf = hf_model_dir(arch)
    runner = SingleSequenceRunner(load_model(path).model, max_len=64)
    for length in (5, 13):
        ids = prompt(length, seed=1)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, length, dtype=torch.long))
        assert runner.greedy(ids, 32) == ref[0, length:].tolist(), (arch, length)


# The cache path does not depend on the architecture: llama3 in make test, the others slow
# (each architecture's greedy tokens above decode through the same cache).
@pytest.mark.parametrize("arch", ["llama3", pytest.param("mistral", marks=pytest.mark.slow),
                                  pytest.param("qwen3", marks=pytest.mark.slow)])
def test_prefill_then_decode_equals_full_forward(arch, hf_model_dir):
    path, _ = hf_model_dir(arch)
    model = load_model(path).model
    ids = prompt(30, seed=2)
    full = SingleSequenceRunner(model, max_len=64).full_logits(ids)
    for prefill, chunk in ((12, 12), (12, 5), (1, 1)):
        runner = SingleSequenceRunner(model, max_len=64, page_size=4)
        rows = []
        for s in range(0, prefill, chunk):
            rows.append(runner.run(ids[s:min(s + chunk, prefill)], s))
        for pos in range(prefill, len(ids)):
            rows.append(runner.run([ids[pos]], pos))
        np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=1e-4 * np.abs(full).max())


def test_sliding_window_is_honoured(hf_model_dir):
    """Sanity of the oracle: dropping the window changes the logits of a long prompt, so the
    parity above really exercises it."""
    path, hf = hf_model_dir("mistral")
    loaded = load_model(path)
    ids = prompt(45)
    no_window = dataclasses.replace(loaded.config, sliding_windows=(None,) * loaded.config.num_layers)
    from flax import nnx

    from jaxserve.models.decoder import CausalLM

    graphdef, state = nnx.split(loaded.model)
    unwindowed = nnx.merge(nnx.split(nnx.eval_shape(lambda: CausalLM(no_window)))[0], state)
    assert rel_err(SingleSequenceRunner(unwindowed, max_len=64).full_logits(ids), hf_logits(hf, ids)) > 1e-2


def test_bfloat16_load_close_to_float32(hf_model_dir):
    path, hf = hf_model_dir("llama3")
    ids = prompt(20)
    ours = SingleSequenceRunner(load_model(path, dtype="bfloat16").model, max_len=64).full_logits(ids)
    assert rel_err(ours, hf_logits(hf, ids)) < 0.05
