"""Micro-benchmark of ragged paged attention and the KV write, per backend.

Times every implementation that runs natively on this machine (the XLA-compiled
reference always, as the baseline; "tpu" on TPU; "gpu" on NVIDIA GPU) on realistic
shapes, and reports the achieved HBM bandwidth against the bytes that must move:
each sequence's K/V context read once, q read once and the output written once.
Prints a markdown table and appends it to BENCHMARKS.md with date, machine and shapes.

  python scripts/bench_attention.py            # 8B-model heads, page sizes 16/64/128
  python scripts/bench_attention.py --small    # tiny shapes, for a CPU
  python scripts/bench_attention.py --backends reference,tpu   # force (tpu/gpu interpret off-device)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp

from pallas_kernels import ragged_paged_attention, resolve_backend, write_kv


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    seqs: tuple[tuple[int, int], ...]   # (q_len, kv_len) per sequence

    def describe(self) -> str:
        kv = [k for _, k in self.seqs]
        q = sum(q for q, _ in self.seqs)
        return (f"{self.name}: {len(self.seqs)} seqs, {q} q tokens, ctx {min(kv)}-{max(kv)}, "
                f"Hq={self.num_q_heads} Hkv={self.num_kv_heads} D={self.head_dim} "
                f"page={self.page_size}")


def shapes(small: bool, seed: int = 0) -> list[Shape]:
    rng = np.random.default_rng(seed)
    if small:
        heads, page_sizes, counts, ctx = (8, 2, 64), (16,), (8,), (128, 512)
    else:
        heads, page_sizes, counts, ctx = (32, 8, 128), (16, 64, 128), (64, 256), (512, 4096)
    out = []
    for page_size in page_sizes:
        for n in counts:
            kv = rng.integers(ctx[0], ctx[1] + 1, n)
            out.append(Shape(f"decode{n}", *heads, page_size, tuple((1, int(k)) for k in kv)))
        # Mixed step: one prefill chunk of ctx[0] tokens next to n - 1 decodes.
        n = counts[0]
        kv = rng.integers(ctx[0], ctx[1] + 1, n)
        seqs = [(ctx[0], int(kv[0]))] + [(1, int(k)) for k in kv[1:]]
        out.append(Shape(f"mixed{n}", *heads, page_size, tuple(seqs)))
    return out


def make_inputs(shape: Shape, dtype, seed: int = 0):
    """Random pages (shuffled ids) and metadata for one step; padded to powers of two."""
    rng = np.random.default_rng(seed)
    ps = shape.page_size
    q_lens = [q for q, _ in shape.seqs]
    pages_per_seq = [-(-k // ps) for _, k in shape.seqs]
    max_pages = max(pages_per_seq)
    num_pages = 1 + sum(pages_per_seq)
    ids = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(shape.seqs), max_pages), np.int32)
    start = 0
    for i, n in enumerate(pages_per_seq):
        tables[i, :n] = ids[start:start + n]
        start += n
    num_tokens = int(2 ** np.ceil(np.log2(sum(q_lens))))
    key = jax.random.key(seed)
    kq, kp, kk = jax.random.split(key, 3)
    return dict(
        q=jax.random.normal(kq, (num_tokens, shape.num_q_heads, shape.head_dim), dtype),
        kv_pages=jax.random.normal(kp, (num_pages, ps, 2 * shape.num_kv_heads, shape.head_dim),
                                   dtype),
        kv_lens=jnp.asarray([k for _, k in shape.seqs], jnp.int32),
        block_tables=jnp.asarray(tables),
        cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
        num_seqs=jnp.asarray([len(shape.seqs)], jnp.int32),
        new_kv=jax.random.normal(kk, (num_tokens, shape.num_kv_heads, shape.head_dim), dtype),
        slots=jnp.asarray(rng.integers(ps, num_pages * ps, num_tokens), jnp.int32),
    )


def bytes_moved(shape: Shape, dtype) -> int:
    """K/V of every context read once + q read + out written (the unavoidable traffic)."""
    item = jnp.dtype(dtype).itemsize
    kv = sum(k for _, k in shape.seqs) * 2 * shape.num_kv_heads * shape.head_dim * item
    q = sum(q for q, _ in shape.seqs) * shape.num_q_heads * shape.head_dim * item
    return kv + 2 * q


def time_fn(fn, *args, iters: int) -> float:
    """Median seconds per call after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_write(x: dict, backend: str, iters: int) -> float:
    """Median seconds of write_kv with the pages donated (in place), as the engine runs it."""
    write = jax.jit(lambda p, k, v, s: write_kv(p, k, v, s, backend=backend), donate_argnums=0)
    pages = jnp.copy(x["kv_pages"])
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        pages = jax.block_until_ready(write(pages, x["new_kv"], x["new_kv"], x["slots"]))
        if i:                                   # the first call compiles
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_one(shape: Shape, backend: str, dtype, iters: int) -> dict:
    x = make_inputs(shape, dtype)
    sm_scale = shape.head_dim ** -0.5
    attn = jax.jit(lambda q, p, kl, bt, cu, n: ragged_paged_attention(
        q, p, kl, bt, cu, n, sm_scale=sm_scale, backend=backend))
    t = time_fn(attn, x["q"], x["kv_pages"], x["kv_lens"], x["block_tables"], x["cu_q_lens"],
                x["num_seqs"], iters=iters)
    t_write = time_write(x, backend, iters)
    nbytes = bytes_moved(shape, dtype)
    return dict(shape=shape.name, page=shape.page_size, backend=backend, ms=t * 1e3,
                gbps=nbytes / t / 1e9, mb=nbytes / 1e6, write_ms=t_write * 1e3)


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{dev.platform}:{dev.device_kind} x{jax.device_count()}, host {platform.node()} "
            f"({os.cpu_count()} CPUs), jax {jax.__version__}")


def table(rows: list[dict]) -> str:
    lines = ["| shape | page | backend | ms | GB/s (vs bytes that must move) | MB moved "
             "| write_kv ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['page']} | {r['backend']} | {r['ms']:.3f} | "
                     f"{r['gbps']:.2f} | {r['mb']:.1f} | {r['write_ms']:.3f} |")
    return "\n".join(lines)


def default_backends() -> list[str]:
    native = resolve_backend("auto")
    return ["reference"] + ([native] if native != "reference" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes for a CPU")
    parser.add_argument("--backends", default=None, help="comma list; default: reference + native")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    backends = args.backends.split(",") if args.backends else default_backends()
    if "reference" not in backends:
        backends.insert(0, "reference")   # the baseline is always measured
    dtype = jnp.dtype(args.dtype)
    iters = args.iters or (3 if args.small else 20)

    rows = []
    for shape in shapes(args.small):
        for backend in backends:
            rows.append(bench_one(shape, backend, dtype, iters))
            print(rows[-1], flush=True)
    label = "CPU, --small" if jax.default_backend() == "cpu" else jax.default_backend().upper()
    report = "\n".join([
        f"### Ragged paged attention ({label}), {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. dtype {dtype.name}, median of {iters} runs after warm-up.",
        "Backends: " + ", ".join(backends) + " (reference = XLA-compiled pure jnp, the baseline).",
        "Shapes:", *[f"- {s.describe()}" for s in shapes(args.small)],
        "", table(rows), "",
    ])
    print(report)
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
