"""Micro-benchmark of ragged paged attention (and the KV write), per backend.

Times every implementation that runs natively on this machine side by side with the dense
reference, on the same inputs, and reports milliseconds, the error against the reference
and the achieved bandwidth against the bytes that must move: each sequence's K/V context
read once (context * 2*Hkv * D * itemsize), q read once and the output written once.

  CPU   reference, xla
  TPU   reference, xla, jax_tpu, pallas_tpu
  GPU   reference, xla, pallas_gpu, and jax's own jax.experimental.pallas.ops.gpu
        paged_attention ("jax_gpu_paged", decode steps only; its [Hkv, P, ps, D] K/V
        arrays are built from our pages outside the timed region)

Shapes: decodes of 1/8/64/256 sequences x context 512/2048/8192 and one mixed step
(prefill chunks beside decodes), Llama-3-8B heads (32 q / 8 kv, head_dim 128), page 16.
`--small` shrinks all of it so a CPU run takes a few minutes. Prints a markdown table and
appends it to BENCHMARKS.md with date, machine, load average and shapes.

  python scripts/bench_attention.py                  # accelerator, 8B-model shapes
  python scripts/bench_attention.py --small          # CPU
  python scripts/bench_attention.py --backends reference,pallas_gpu --page-sizes 16,128
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import platform
import time
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp

from jaxserve.kernels import ragged_paged_attention, write_kv

JAX_GPU_PAGED = "jax_gpu_paged"     # jax.experimental.pallas.ops.gpu.paged_attention
KERNEL_ROWS = {"gpu": ("pallas_gpu", JAX_GPU_PAGED), "tpu": ("jax_tpu", "pallas_tpu")}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    seqs: tuple[tuple[int, int], ...]   # (q_len, kv_len) per sequence

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q, _ in self.seqs)

    def describe(self) -> str:
        kv = [k for _, k in self.seqs]
        q = sum(q for q, _ in self.seqs)
        return (f"{self.name}: {len(self.seqs)} seqs, {q} q tokens, ctx {min(kv)}-{max(kv)}, "
                f"Hq={self.num_q_heads} Hkv={self.num_kv_heads} D={self.head_dim} "
                f"page={self.page_size}")


def shapes(small: bool, page_sizes: tuple[int, ...]) -> list[Shape]:
    if small:
        heads, counts, contexts = (8, 2, 64), (1, 8, 64), (512, 2048)
        chunks, chunk_len, decodes, decode_ctx = 2, 128, 14, 512
    else:
        heads, counts, contexts = (32, 8, 128), (1, 8, 64, 256), (512, 2048, 8192)
        chunks, chunk_len, decodes, decode_ctx = 4, 512, 60, 2048
    out = []
    for ps in page_sizes:
        for n in counts:
            for ctx in contexts:
                out.append(Shape(f"decode{n}x{ctx}", *heads, ps, ((1, ctx),) * n))
        # Mixed step: prefill chunks (the i-th at context (i+1) * chunk_len) beside decodes.
        prefill = tuple((chunk_len, (i + 1) * chunk_len) for i in range(chunks))
        out.append(Shape(f"mixed{chunks}p+{decodes}d", *heads, ps,
                         prefill + ((1, decode_ctx),) * decodes))
    return out


def make_inputs(shape: Shape, dtype, seed: int = 0) -> dict:
    """Random pages (shuffled ids) and metadata for one step; tokens padded to a power of 2."""
    rng = np.random.default_rng(seed)
    ps = shape.page_size
    q_lens = [q for q, _ in shape.seqs]
    pages_per_seq = [-(-k // ps) for _, k in shape.seqs]
    num_pages = 1 + sum(pages_per_seq)
    ids = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(shape.seqs), max(pages_per_seq)), np.int32)
    start = 0
    for i, n in enumerate(pages_per_seq):
        tables[i, :n] = ids[start:start + n]
        start += n
    num_tokens = int(2 ** np.ceil(np.log2(sum(q_lens))))
    kq, kp, kk = jax.random.split(jax.random.key(seed), 3)
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


def time_fn(fn, *args, iters: int) -> tuple[float, jax.Array]:
    """(median seconds per call after one warm-up (compile) call, the output)."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def time_write(x: dict, iters: int) -> float:
    """Median seconds of write_kv with the pages donated (in place), as the engine runs it."""
    write = jax.jit(lambda p, k, v, s: write_kv(p, k, v, s), donate_argnums=0)
    pages = jnp.copy(x["kv_pages"])
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        pages = jax.block_until_ready(write(pages, x["new_kv"], x["new_kv"], x["slots"]))
        if i:                                   # the first call compiles
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def jax_gpu_paged_fn(shape: Shape, x: dict, sm_scale: float, k_splits: int = 16):
    """jax's GPU paged_attention on our inputs: (fn, args), layouts converted untimed.

    Its K/V are [Hkv, P, ps, D]; its table width must be k_splits * a power of two (padded
    with the null page, masked by lengths); it applies no sm_scale, so q is pre-scaled.
    """
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    k_pages = jnp.moveaxis(x["kv_pages"][:, :, 0::2], 2, 0)
    v_pages = jnp.moveaxis(x["kv_pages"][:, :, 1::2], 2, 0)
    tables = x["block_tables"]
    per_split = int(2 ** np.ceil(np.log2(-(-tables.shape[1] // k_splits))))
    tables = jnp.pad(tables, ((0, 0), (0, per_split * k_splits - tables.shape[1])))
    q = x["q"][:len(shape.seqs)] * jnp.asarray(sm_scale, x["q"].dtype)
    interpret = jax.default_backend() not in ("gpu", "cuda")
    fn = jax.jit(lambda *a: paged_attention(*a, k_splits=k_splits, interpret=interpret))
    return fn, (q, k_pages, v_pages, tables, x["kv_lens"])


def bench_one(shape: Shape, backend: str, x: dict, want, dtype, iters: int) -> dict:
    """(row, output); `want` is the reference output, None if it is not available."""
    sm_scale = shape.head_dim ** -0.5
    if backend == JAX_GPU_PAGED:
        fn, args = jax_gpu_paged_fn(shape, x, sm_scale)
    else:
        fn = jax.jit(lambda q, p, kl, bt, cu, n: ragged_paged_attention(
            q, p, kl, bt, cu, n, sm_scale=sm_scale, backend=backend))
        args = (x["q"], x["kv_pages"], x["kv_lens"], x["block_tables"], x["cu_q_lens"],
                x["num_seqs"])
    t, out = time_fn(fn, *args, iters=iters)
    n = out.shape[0] if backend == JAX_GPU_PAGED else int(x["cu_q_lens"][-1])
    if backend == "reference":
        err = 0.0
    elif want is None:                  # the reference failed: nothing to compare with
        err = float("nan")
    else:
        err = float(jnp.max(jnp.abs(out[:n].astype(jnp.float32) - want[:n].astype(jnp.float32))))
    nbytes = bytes_moved(shape, dtype)
    return dict(shape=shape.name, page=shape.page_size, backend=backend, ms=t * 1e3,
                gbps=nbytes / t / 1e9, mb=nbytes / 1e6, err=err), out


def bench_shape(shape: Shape, backends: list[str], dtype, iters: int) -> list[dict]:
    """All backends on one shape, the reference first (its output is what the others match)."""
    x = make_inputs(shape, dtype)
    rows, want = [], None
    for backend in backends:
        if backend == JAX_GPU_PAGED and not shape.is_decode:
            continue
        try:
            row, out = bench_one(shape, backend, x, want, dtype, iters)
        except Exception as e:          # a failing backend must not hide the others
            row = dict(shape=shape.name, page=shape.page_size, backend=backend,
                       failed=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            out = None
        if backend == "reference":
            want = out
        rows.append(row)
        print(row, flush=True)
    rows[0]["write_ms"] = time_write(x, iters) * 1e3
    return rows


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{dev.platform}:{dev.device_kind} x{jax.device_count()}, host {platform.node()} "
            f"({os.cpu_count()} CPUs), jax {jax.__version__}")


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def table(rows: list[dict]) -> str:
    lines = ["| shape | page | backend | ms | GB/s (vs bytes that must move) | MB moved "
             "| max abs err vs reference | write_kv ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        write = f"{r['write_ms']:.3f}" if "write_ms" in r else ""
        if "failed" in r:
            lines.append(f"| {r['shape']} | {r['page']} | {r['backend']} | failed: "
                         f"{r['failed']} | | | | {write} |")
            continue
        lines.append(f"| {r['shape']} | {r['page']} | {r['backend']} | {r['ms']:.3f} | "
                     f"{r['gbps']:.2f} | {r['mb']:.1f} | {r['err']:.2e} | {write} |")
    return "\n".join(lines)


def native_backends() -> list[str]:
    """reference, xla (once it exists), and the kernels written for this platform."""
    backends = ["reference"]
    if importlib.util.find_spec("jaxserve.kernels.attention_xla") is not None:
        backends.append("xla")
    platform_name = "gpu" if jax.default_backend() in ("gpu", "cuda") else jax.default_backend()
    return backends + list(KERNEL_ROWS.get(platform_name, ()))


def not_measured_note() -> str | None:
    platform_name = jax.default_backend()
    if platform_name in ("gpu", "cuda", "tpu"):
        return None
    kernels = ", ".join(k for ks in KERNEL_ROWS.values() for k in ks)
    return (f"**No GPU or TPU on this machine ({platform_name}): the kernel rows ({kernels}) "
            "were not measured.** Kernels run only interpreted off their platform, which says "
            "nothing about their speed.")


def report(rows, shape_list, backends, dtype, iters, loads, note) -> str:
    label = "CPU, --small" if jax.default_backend() == "cpu" else jax.default_backend().upper()
    title = f"### Ragged paged attention ({label}), {datetime.date.today().isoformat()}"
    missing = not_measured_note()
    return "\n".join([
        title + (f": {note}" if note else ""), "",
        f"Machine: {machine()}. Load average (1/5/15 min) {loads[0]} before, {loads[1]} after.",
        f"dtype {dtype.name}, median of {iters} runs after warm-up.",
        "Backends: " + ", ".join(backends) + " (reference = XLA-compiled dense jnp, the "
        "baseline; errors are max |out - reference| over the real rows).",
        *([missing] if missing else []),
        "Shapes:", *[f"- {s.describe()}" for s in shape_list],
        "", table(rows), "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="small shapes for a CPU")
    parser.add_argument("--backends", default=None,
                        help=f"comma list of backend names or {JAX_GPU_PAGED}; default: the "
                             "native ones (reference always runs first)")
    parser.add_argument("--page-sizes", default="16", help="comma list, e.g. 16,128")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--note", default="", help="appended to the table's heading")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    backends = args.backends.split(",") if args.backends else native_backends()
    backends = ["reference"] + [b for b in backends if b != "reference"]
    dtype = jnp.dtype(args.dtype)
    iters = args.iters or (3 if args.small else 20)
    shape_list = shapes(args.small, tuple(int(p) for p in args.page_sizes.split(",")))

    load_before = load_average()
    rows = [row for shape in shape_list for row in bench_shape(shape, backends, dtype, iters)]
    text = report(rows, shape_list, backends, dtype, iters, (load_before, load_average()),
                  args.note)
    print(text)
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
