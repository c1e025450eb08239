"""Multi-LoRA overhead (issue 18): engine decode step time of a base-only batch against one adapter
and a batch mixing 4 adapters, per delta formulation (onehot / gather / ragged_dot), and the
delta alone at one layer's shapes. Prints markdown tables for BENCHMARKS.md with `uptime`'s load
average before and after.

    python scripts/bench_lora.py                       # the demo model, CPU preset
    python scripts/bench_lora.py --model DIR --rank 16 --num-seqs 32 --new-tokens 48

Adapters are random PEFT-format directories (adapter_config.json + adapter_model.safetensors,
rank --rank on all seven projections) written to a temporary directory: nothing is downloaded.
Step time = wall time of one generate() of --num-seqs greedy requests divided by the engine
steps it took (prefill steps included; the workload is decode-heavy: 8-token prompts).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(path: Path, cfg, rank: int, seed: int) -> None:
    """A PEFT LoRA adapter on every projection of a model of config `cfg` (a ModelConfig)."""
    from safetensors.numpy import save_file

    from jaxserve.models.lora_layers import hf_module_shapes

    rng = np.random.default_rng(seed)
    shapes = hf_module_shapes(cfg)
    tensors = {}
    for layer in range(cfg.num_layers):
        for m in MODULES:
            d_in, d_out = shapes[m]
            part = "self_attn" if m in MODULES[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = (0.05 * rng.standard_normal((rank, d_in))).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (0.05 * rng.standard_normal((d_out, rank))).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES), "bias": "none"}))


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1]
    except OSError:
        return "?"


def step_ms(llm, prompts, params, loras) -> float:
    """Wall ms per engine step of one generate()."""
    engine = llm.engine
    steps = [0]
    real = engine.step

    def counted():
        steps[0] += 1
        return real()

    engine.step = counted
    try:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        return (time.perf_counter() - start) * 1e3 / steps[0]
    finally:
        engine.step = real


def engine_table(args, adapters) -> list[str]:
    """Every engine is built first; then the cases run in interleaved rounds (best of --repeats
    each), so that load from other work on the machine spreads over all of them alike."""
    from jaxserve import LLM, LoRARequest, SamplingParams

    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 900, 8).tolist() for _ in range(args.num_seqs)]
    params = [SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)] * args.num_seqs
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    common = dict(config=args.config, max_num_seqs=args.num_seqs, seq_buckets=[args.num_seqs],
                  token_buckets=[args.num_seqs, 256], max_num_batched_tokens=256)
    cases = [("enable_lora off", LLM(args.model, **common), "base only", None)]
    for method in args.methods.split(","):
        llm = LLM(args.model, **common, enable_lora=True, max_loras=4, max_lora_rank=args.rank,
                  lora_delta_method=method)
        llm.generate(prompts[:4], params[:4], use_tqdm=False, lora_request=loras)  # all 4 into their slots
        cases += [(f"LoRA ({method})", llm, "base only", None), (f"LoRA ({method})", llm, "1 adapter", loras[0]),
                  (f"LoRA ({method})", llm, "4 adapters mixed", [loras[i % 4] for i in range(args.num_seqs)])]
    best = [float("inf")] * len(cases)
    for _ in range(args.repeats):
        for k, (_, llm, _, lora) in enumerate(cases):
            best[k] = min(best[k], step_ms(llm, prompts, params, lora))
    rows = ["| engine | batch | ms / step (best of %d) | vs no-LoRA engine | compiles after warm-up |" % args.repeats,
            "|---|---|---|---|---|"]
    for (engine, llm, batch, _), ms in zip(cases, best):
        extra = llm.stats()["compile_count"] - len(llm.engine.runner.shapes_to_compile())
        rows.append(f"| {engine} | {batch} | {ms:.2f} | {ms / best[0]:.2f} | {extra} |")
    return rows


def delta_table(args) -> list[str]:
    """The delta alone: x [T, D] against A [S, D, R] / B [S, R, O], tokens spread over the slots."""
    import jax
    import jax.numpy as jnp

    from jaxserve.models.lora_layers import LORA_METHODS, lora_delta_shaped

    rows = ["| T | D -> O | slots | rank | method | ms / call | dense base matmul ms |",
            "|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for t, d, o in ((args.num_seqs, 256, 256), (256, 1024, 1024), (256, 4096, 4096)):
        s, r = 5, args.rank
        x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
        a = jnp.asarray(rng.standard_normal((s, d, r)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((s, r, o)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((d, o)), jnp.float32)
        slots = jnp.asarray(rng.integers(0, s, t), jnp.int32)
        base = _time(jax.jit(lambda x, w: x @ w), x, w)
        for method in LORA_METHODS:
            f = jax.jit(lora_delta_shaped, static_argnums=(4,))
            rows.append(f"| {t} | {d} -> {o} | {s} | {r} | {method} | {_time(f, x, a, b, slots, method):.3f} | "
                        f"{base:.3f} |")
    return rows


def _time(f, *a, n: int = 20) -> float:
    f(*a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            out = f(*a)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) * 1e3 / n)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the demo model)")
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-seqs", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", default="onehot,gather,ragged")
    p.add_argument("--skip-engine", action="store_true")
    args = p.parse_args()

    import jax

    from jaxserve.demo_model import ensure_demo_model
    from jaxserve.models.config import ModelConfig
    from jaxserve.models.model_files import read_hf_config, resolve_model_dir

    args.model = args.model or str(ensure_demo_model())
    cfg = ModelConfig.from_hf(read_hf_config(resolve_model_dir(args.model)))
    print(f"model {args.model}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
          f"mlp {cfg.intermediate_size}; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{len(jax.devices())} device(s)")
    print(f"load average (1/5/15 min) before: {uptime()}")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [Path(tmp) / f"a{i}" for i in range(4)]
        for i, path in enumerate(adapters):
            write_random_adapter(path, cfg, args.rank, seed=i)
        if not args.skip_engine:
            print("\n".join(engine_table(args, adapters)))
        print()
        print("\n".join(delta_table(args)))
    print(f"\nload average (1/5/15 min) after: {uptime()}")


if __name__ == "__main__":
    main()
