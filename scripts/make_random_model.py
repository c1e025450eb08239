"""Writes a random-weight Hugging Face Llama of a real model's shape, for benchmarks.

Nothing is downloaded: the architecture comes from a preset below, the tokenizer is the demo
model's locally trained one (its ids are a subset of the model's vocabulary), the weights
are drawn from a fixed seed in bf16 (or float32) and written as sharded safetensors with an
index, one tensor at a time. Both jaxserve and transformers load the result.

    python scripts/make_random_model.py llama3-8b /tmp/llama3-8b-random
    python scripts/benchmark_throughput.py --model /tmp/llama3-8b-random --config configs/gpu-h200-1.yaml
    python scripts/make_random_model.py bench-medium /tmp/bench-medium --dtype float32   # CPU benchmarks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

PRESETS = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, rope_theta, max_position)
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0, 8192),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 128256, 500000.0, 8192),
    "llama3-70b": (8192, 28672, 80, 64, 8, 128256, 500000.0, 8192),
    "small": (512, 1408, 8, 8, 4, 32000, 10000.0, 4096),
    # CPU throughput benchmarks (BENCHMARKS.md): max_position 8192 so that max_model_len 8192
    # is not clamped. bench-small is the demo model's shape (and vocabulary size).
    "bench-small": (256, 688, 4, 8, 4, 1024, 10000.0, 8192),
    "bench-medium": (1024, 2816, 8, 16, 4, 32000, 10000.0, 8192),
}
SHARD_BYTES = 4 << 30


def tensors(preset: tuple, rng: np.random.Generator, dtype):
    """Yields (HF name, array) one at a time."""
    d, f, n_layers, h, kv, v = preset[:6]
    hd = d // h

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    yield "model.embed_tokens.weight", w(v, d)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", np.ones(d, dtype)
        yield p + "post_attention_layernorm.weight", np.ones(d, dtype)
        yield p + "self_attn.q_proj.weight", w(h * hd, d)
        yield p + "self_attn.k_proj.weight", w(kv * hd, d)
        yield p + "self_attn.v_proj.weight", w(kv * hd, d)
        yield p + "self_attn.o_proj.weight", w(d, h * hd)
        yield p + "mlp.gate_proj.weight", w(f, d)
        yield p + "mlp.up_proj.weight", w(f, d)
        yield p + "mlp.down_proj.weight", w(d, f)
    yield "model.norm.weight", np.ones(d, dtype)
    yield "lm_head.weight", w(v, d)


def write(name: str, out: Path, dtype_name: str, seed: int) -> Path:
    from safetensors.numpy import save_file

    from jaxserve.demo_model import train_tokenizer

    preset = PRESETS[name]
    d, f, n_layers, h, kv, v, theta, max_pos = preset
    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.float32
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    if len(tokenizer) > v:
        raise ValueError(f"preset {name}: vocab {v} is smaller than the tokenizer's {len(tokenizer)} tokens")
    tokenizer.model_max_length = max_pos
    tokenizer.save_pretrained(out)
    eos = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "intermediate_size": f, "num_hidden_layers": n_layers, "num_attention_heads": h,
              "num_key_value_heads": kv, "head_dim": d // h, "vocab_size": v, "max_position_embeddings": max_pos,
              "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
              "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": [eos],
              "dtype": dtype_name, "hidden_act": "silu", "jaxserve_random_model": {"preset": name, "seed": seed}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rng = np.random.default_rng(seed)
    shard: dict[str, np.ndarray] = {}  # only the shard being filled is in memory
    names: list[list[str]] = []
    files: list[Path] = []

    def flush() -> None:
        path = out / f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append(path)
        names.append(list(shard))
        shard.clear()

    size = 0
    for tname, array in tensors(preset, rng, dtype):
        if size + array.nbytes > SHARD_BYTES and shard:
            flush()
            size = 0
        shard[tname] = array
        size += array.nbytes
    flush()
    total = len(files)
    weight_map = {}
    for i, (path, group) in enumerate(zip(files, names)):
        final = out / f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        path.rename(final)
        weight_map.update({t: final.name for t in group})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write(args.preset, Path(args.out), args.dtype, args.seed)
    print(f"wrote a random {args.preset} ({args.dtype}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
