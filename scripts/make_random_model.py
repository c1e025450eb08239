"""Writes a random-weight Hugging Face Llama of a real model's shape, for benchmarks; also the
mixtures of experts of MOE_PRESETS (Mixtral-8x7B and Qwen3-30B-A3B with their real config
values, and a small one for CPU benchmarks), with per-expert tensors as published checkpoints.

Nothing is downloaded: the architecture comes from a preset below, the tokenizer is the demo
model's locally trained one (its ids are a subset of the model's vocabulary), the weights
are drawn from a fixed seed in bf16 (or float32) and written as sharded safetensors with an
index, one tensor at a time. Both jaxserve and transformers load the result.

    python scripts/make_random_model.py llama3-8b /tmp/llama3-8b-random
    python scripts/benchmark_throughput.py --model /tmp/llama3-8b-random --config configs/gpu-h200-1.yaml
    python scripts/make_random_model.py bench-medium /tmp/bench-medium --dtype float32   # CPU benchmarks
    python scripts/make_random_model.py qwen3-30b-a3b /tmp/qwen3-30b-a3b-random   # 61 GB in bf16
    python scripts/make_random_model.py bench-moe-small /tmp/bench-moe-small --dtype float32
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
# Mixtures of experts: config.json fields of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B
# (tokens ids come from the demo tokenizer, a subset of the vocabulary), and bench-moe-small, a
# Qwen3-MoE of bench-small's width (8 experts of 512, top-2) for CPU benchmarks.
MOE_PRESETS = {
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "sliding_window": None,
        "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "tie_word_embeddings": False,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 48, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
    },
    "bench-moe-small": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 256,
        "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 32, "vocab_size": 1024, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "moe_intermediate_size": 512, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
        "tie_word_embeddings": False,
    },
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


def moe_tensors(cfg: dict, rng: np.random.Generator, dtype):
    """Yields (HF name, array) of a MOE_PRESETS config one at a time, per-expert tensors named as
    the published checkpoints name them (Mixtral: block_sparse_moe.experts.{e}.w1/w3/w2)."""
    d, v, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    mixtral = cfg["model_type"] == "mixtral"
    e = cfg["num_local_experts"] if mixtral else cfg["num_experts"]
    f = cfg["intermediate_size"] if mixtral else cfg["moe_intermediate_size"]
    block, names = ("block_sparse_moe.", ("w1", "w3", "w2")) if mixtral else ("mlp.", ("gate_proj", "up_proj", "down_proj"))

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    yield "model.embed_tokens.weight", w(v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", np.ones(d, dtype)
        yield p + "post_attention_layernorm.weight", np.ones(d, dtype)
        yield p + "self_attn.q_proj.weight", w(h * hd, d)
        yield p + "self_attn.k_proj.weight", w(kv * hd, d)
        yield p + "self_attn.v_proj.weight", w(kv * hd, d)
        yield p + "self_attn.o_proj.weight", w(d, h * hd)
        if not mixtral:
            yield p + "self_attn.q_norm.weight", np.ones(hd, dtype)
            yield p + "self_attn.k_norm.weight", np.ones(hd, dtype)
        yield p + block + "gate.weight", w(e, d)
        for j in range(e):
            gate, up, down = (p + block + f"experts.{j}.{n}.weight" for n in names)
            yield gate, w(f, d)
            yield up, w(f, d)
            yield down, w(d, f)
    yield "model.norm.weight", np.ones(d, dtype)
    yield "lm_head.weight", w(v, d)


def write(name: str, out: Path, dtype_name: str, seed: int) -> Path:
    if name in MOE_PRESETS:
        return write_moe(name, out, dtype_name, seed)
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
    return write_shards(out, tensors(preset, np.random.default_rng(seed), dtype))


def write_moe(name: str, out: Path, dtype_name: str, seed: int) -> Path:
    """A MOE_PRESETS model: its config.json (with the demo tokenizer's special ids) and tensors."""
    from jaxserve.demo_model import train_tokenizer

    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.float32
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.model_max_length = MOE_PRESETS[name]["max_position_embeddings"]
    tokenizer.save_pretrained(out)
    config = {**MOE_PRESETS[name], "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": [tokenizer.convert_tokens_to_ids("<|eot_id|>")], "pad_token_id": tokenizer.pad_token_id,
              "dtype": dtype_name, "hidden_act": "silu", "jaxserve_random_model": {"preset": name, "seed": seed}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return write_shards(out, moe_tensors(config, np.random.default_rng(seed), dtype))


def write_shards(out: Path, source) -> Path:
    """Writes (name, array) pairs as sharded safetensors with an index, one shard in memory."""
    from safetensors.numpy import save_file

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
    for tname, array in source:
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
    parser.add_argument("preset", choices=sorted(PRESETS) + sorted(MOE_PRESETS))
    parser.add_argument("out")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write(args.preset, Path(args.out), args.dtype, args.seed)
    print(f"wrote a random {args.preset} ({args.dtype}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
