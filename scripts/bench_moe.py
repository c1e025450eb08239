"""Times the mixture-of-experts block's expert computation on this machine's default device:
the grouped matmul over expert-sorted rows (models.moe.grouped_experts, jax.lax.ragged_dot)
against every expert applied to every token (models.moe.dense_reference), per step size.

    python scripts/bench_moe.py                                   # bench-moe-small's shape
    python scripts/bench_moe.py --experts 128 --top-k 8 --hidden 2048 --width 768   # Qwen3-30B-A3B's

Prints one row per token count: milliseconds per call (median of --repeat after one warm-up
call) and the ratio. On CPU jax expands ragged_dot into masked dense products over the groups,
so the grouped path there does E * T * k row-products where the dense one does E * T.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.moe import dense_reference, grouped_experts


def time_ms(fn, *args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tokens", default="16,64,256")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    e, k, d, f = args.experts, args.top_k, args.hidden, args.width
    rng = np.random.default_rng(0)
    gate_up = jnp.asarray(rng.standard_normal((e, d, 2 * f)) * 0.02, dtype)
    down = jnp.asarray(rng.standard_normal((e, f, d)) * 0.02, dtype)
    grouped, dense = jax.jit(grouped_experts), jax.jit(dense_reference)
    print(f"device {jax.devices()[0].device_kind}, E={e} k={k} D={d} F={f} {args.dtype}")
    print("| tokens | grouped (ms) | dense, all experts (ms) | grouped / dense |")
    print("|---:|---:|---:|---:|")
    for t in (int(x) for x in args.tokens.split(",")):
        x = jnp.asarray(rng.standard_normal((t, d)), dtype)
        experts = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(t)]), jnp.int32)
        weights = jnp.full((t, k), 1.0 / k, jnp.float32)
        g = time_ms(grouped, x, weights, experts, gate_up, down, repeat=args.repeat)
        r = time_ms(dense, x, weights, experts, gate_up, down, repeat=args.repeat)
        print(f"| {t} | {g:.3f} | {r:.3f} | {g / r:.2f} |")


if __name__ == "__main__":
    main()
