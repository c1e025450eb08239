"""scripts/train_tiny_lm.py, a few steps on a tiny corpus: the directory it writes loads in
transformers and in jaxserve (equal logits), generates, records its held-out loss, and the
same seed and step count give the same weights."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxserve import LLM, SamplingParams
from jaxserve.models.loader import load_model
from jaxserve.models.single_sequence import SingleSequenceRunner

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "train_tiny_lm.py"
TINY = ["--steps", "12", "--warmup", "6", "--eval-every", "6", "--eval-windows", "4", "--seq-len", "64",
        "--batch", "4", "--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
        "--intermediate", "128", "--heldout-every", "3"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, script) -> Path:
    """Twelve files cut from the repository's own source, at least one of them held out."""
    root = tmp_path_factory.mktemp("corpus")
    text = (ROOT / "jaxserve" / "demo_model.py").read_text()
    step = len(text) // 12
    for i in range(12):
        (root / f"part{i}.py").write_text(text[i * step:(i + 1) * step])
    held = [i for i in range(12) if script.held_out(f"part{i}.py", 3)]
    assert 0 < len(held) < 12
    return root


def train(script, corpus: Path, out: Path) -> Path:
    torch.set_num_threads(1)
    assert script.main(["--out", str(out), "--corpus", str(corpus), *TINY]) == 0
    return out


def test_trained_model_loads_in_transformers_and_jaxserve(script, corpus, tmp_path):
    path = train(script, corpus, tmp_path / "tiny")
    record = json.loads((path / "training.json").read_text())
    assert record["steps"] == 12 and record["corpus"]["heldout_files"] > 0
    assert math.isfinite(record["heldout_loss"]) and record["heldout_loss"] < math.log(1024)
    assert (path / "heldout.txt").read_text().strip()

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode("def write_demo_model(path", add_special_tokens=False)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = SingleSequenceRunner(load_model(str(path)).model, max_len=32).full_logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    llm = LLM(str(path), config="cpu", max_num_seqs=4)
    out = llm.generate(["def main():"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6


def test_same_seed_and_steps_same_weights(script, corpus, tmp_path):
    a = train(script, corpus, tmp_path / "a")
    b = train(script, corpus, tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
