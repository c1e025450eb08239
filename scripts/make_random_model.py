"""Writes a random-weight Hugging Face model of a real model's shape, for benchmarks: Llama
shapes (PRESETS, Phi-3 among them: PHI3_CONFIGS), Gemma 2 / 3 (GEMMA_PRESETS: the real models'
config values) and the mixtures of experts of MOE_PRESETS (Mixtral-8x7B and Qwen3-30B-A3B with
their real config values, and a small one for CPU benchmarks), with per-expert tensors as
published checkpoints.

Nothing is downloaded: the architecture comes from a preset below, the tokenizer is the demo
model's locally trained one (its ids are a subset of the model's vocabulary), the weights
are drawn from a fixed seed in bf16 (or float32) and written as sharded safetensors with an
index, one tensor at a time. Both jaxserve and transformers load the result.

    python scripts/make_random_model.py llama3-8b /tmp/llama3-8b-random
    python scripts/benchmark_throughput.py --model /tmp/llama3-8b-random --config configs/gpu-h200-1.yaml
    python scripts/make_random_model.py bench-medium /tmp/bench-medium --dtype float32   # CPU benchmarks
    python scripts/make_random_model.py gemma2-9b /tmp/gemma2-9b-random
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
    "phi3-mini": (3072, 8192, 32, 32, 32, 32064, 10000.0, 131072),
}
# Phi-3 presets: fused qkv_proj / gate_up_proj tensors and these config.json fields. phi3-mini
# is microsoft/Phi-3.5-mini-instruct's config (the shape of Phi-3-mini-128k: 3.8B parameters,
# LongRoPE from 4096 to 131072 positions, one factor per rotary frequency, 48 of each).
PHI3_MINI_SHORT_FACTOR = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533]
PHI3_MINI_LONG_FACTOR = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062]
PHI3_CONFIGS = {
    "phi3-mini": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "original_max_position_embeddings": 4096,
                  "sliding_window": 262144, "rope_parameters": {
                      "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": PHI3_MINI_SHORT_FACTOR,
                      "long_factor": PHI3_MINI_LONG_FACTOR}},
}
# Gemma: the config.json fields of google/gemma-2-9b and of the language model of
# google/gemma-3-4b-pt (written as a text-only Gemma3ForCausalLM, transformers 5 form), the
# fields left at their defaults there written out. Embeddings are tied (no lm_head).
GEMMA_PRESETS = {
    "gemma2-9b": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
        "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0, "attention_bias": False, "tie_word_embeddings": True,
        "layer_types": ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(42)],
    },
    "gemma3-4b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 2560,
        "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "vocab_size": 262208, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 1024,
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        "tie_word_embeddings": True,
        "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(34)],
    },
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


def tensors(preset: tuple, rng: np.random.Generator, dtype, fused: bool = False):
    """Yields (HF name, array) one at a time; fused: Phi-3's qkv_proj and gate_up_proj."""
    d, f, n_layers, h, kv, v = preset[:6]
    hd = d // h

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    yield "model.embed_tokens.weight", w(v, d)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", np.ones(d, dtype)
        yield p + "post_attention_layernorm.weight", np.ones(d, dtype)
        if fused:  # rows q | k | v and gate | up
            yield p + "self_attn.qkv_proj.weight", w((h + 2 * kv) * hd, d)
        else:
            yield p + "self_attn.q_proj.weight", w(h * hd, d)
            yield p + "self_attn.k_proj.weight", w(kv * hd, d)
            yield p + "self_attn.v_proj.weight", w(kv * hd, d)
        yield p + "self_attn.o_proj.weight", w(d, h * hd)
        if fused:
            yield p + "mlp.gate_up_proj.weight", w(2 * f, d)
        else:
            yield p + "mlp.gate_proj.weight", w(f, d)
            yield p + "mlp.up_proj.weight", w(f, d)
        yield p + "mlp.down_proj.weight", w(d, f)
    yield "model.norm.weight", np.ones(d, dtype)
    yield "lm_head.weight", w(v, d)


def gemma_tensors(cfg: dict, rng: np.random.Generator, dtype):
    """Yields (HF name, array) of a Gemma 2 / 3 config one at a time. Norm weights are zeros,
    Gemma's identity (it scales by 1 + weight); Gemma 3 has q/k norms; embeddings are tied."""
    d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    yield "model.embed_tokens.weight", w(v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            yield p + norm + ".weight", np.zeros(d, dtype)
        yield p + "self_attn.q_proj.weight", w(h * hd, d)
        yield p + "self_attn.k_proj.weight", w(kv * hd, d)
        yield p + "self_attn.v_proj.weight", w(kv * hd, d)
        yield p + "self_attn.o_proj.weight", w(d, h * hd)
        if cfg["model_type"] == "gemma3_text":
            yield p + "self_attn.q_norm.weight", np.zeros(hd, dtype)
            yield p + "self_attn.k_norm.weight", np.zeros(hd, dtype)
        yield p + "mlp.gate_proj.weight", w(f, d)
        yield p + "mlp.up_proj.weight", w(f, d)
        yield p + "mlp.down_proj.weight", w(d, f)
    yield "model.norm.weight", np.zeros(d, dtype)


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

    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.float32
    if name in GEMMA_PRESETS:
        v, max_pos = GEMMA_PRESETS[name]["vocab_size"], GEMMA_PRESETS[name]["max_position_embeddings"]
    else:
        preset = PRESETS[name]
        d, f, n_layers, h, kv, v, theta, max_pos = preset
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    if len(tokenizer) > v:
        raise ValueError(f"preset {name}: vocab {v} is smaller than the tokenizer's {len(tokenizer)} tokens")
    tokenizer.model_max_length = max_pos
    tokenizer.save_pretrained(out)
    eos = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    rng = np.random.default_rng(seed)
    if name in GEMMA_PRESETS:
        config = {**GEMMA_PRESETS[name], "bos_token_id": tokenizer.bos_token_id, "eos_token_id": [eos],
                  "pad_token_id": tokenizer.pad_token_id, "dtype": dtype_name,
                  "jaxserve_random_model": {"preset": name, "seed": seed}}
        source = gemma_tensors(config, rng, dtype)
    else:
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
                  "intermediate_size": f, "num_hidden_layers": n_layers, "num_attention_heads": h,
                  "num_key_value_heads": kv, "head_dim": d // h, "vocab_size": v, "max_position_embeddings": max_pos,
                  "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
                  "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": [eos],
                  "dtype": dtype_name, "hidden_act": "silu", "jaxserve_random_model": {"preset": name, "seed": seed}}
        if name in PHI3_CONFIGS:  # Phi3Config's default pad id (32000) may lie outside a small vocabulary
            config.update(PHI3_CONFIGS[name], pad_token_id=tokenizer.pad_token_id)
        source = tensors(preset, rng, dtype, fused=name in PHI3_CONFIGS)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return write_shards(out, source)


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
    parser.add_argument("preset", choices=sorted(PRESETS) + sorted(GEMMA_PRESETS) + sorted(MOE_PRESETS))
    parser.add_argument("out")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write(args.preset, Path(args.out), args.dtype, args.seed)
    print(f"wrote a random {args.preset} ({args.dtype}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
