"""The xla attention backend's decode block cap (pallas_kernels/attention_xla.py,
DECODE_BLOCK_MAX_KEYS) against no cap, in one run: ms per call of ragged_paged_attention_xla
on decode batches at Llama-3-8B head shapes and at the test models' tiny heads. Prints a
markdown table and appends it to BENCHMARKS.md with the load average.

    python scripts/bench_decode_block.py [--no-append]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "pallas_kernels"))

import jaxserve.kernels.attention_xla as ax  # noqa: E402
from rpa_batch import make_batch  # noqa: E402

CAPS = (1 << 30, 128, 64)  # no cap (the old rule: ~2 MiB per iteration only), 128 keys, 64 keys (default)
CASES = {  # name: (seqs (q_len, kv_len), q heads, kv heads, head_dim, dtype, T, S, max pages per seq)
    "8B heads, 1 decode, context 2000": ([(1, 2000)], 32, 8, 128, jnp.bfloat16, 16, 16, 256),
    "8B heads, 4 decodes, context 1000": ([(1, 1000)] * 4, 32, 8, 128, jnp.bfloat16, 16, 16, 256),
    "8B heads, 16 decodes, context 400": ([(1, 400)] * 16, 32, 8, 128, jnp.bfloat16, 16, 16, 256),
    "tiny heads (4/2 x 16), 1 decode, context 400": ([(1, 400)], 4, 2, 16, jnp.float32, 32, 16, 32),
    "tiny heads, 16 decodes, context 400": ([(1, 400)] * 16, 4, 2, 16, jnp.float32, 32, 16, 32),
    "tiny heads, 16 decodes, context 20": ([(1, 20)] * 16, 4, 2, 16, jnp.float32, 32, 16, 32),
}


def bench(seqs, hq, hkv, d, dtype, t, s, max_pages, reps: int = 7) -> dict[int, float]:
    batch = make_batch(seqs, page_size=16, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, max_seqs=s,
                       num_tokens=t, max_pages_per_seq=max_pages, dtype=dtype)
    args = (batch.q, jnp.nan_to_num(batch.kv_pages), *batch.args[2:])
    out = {}
    for cap in CAPS:
        ax.DECODE_BLOCK_MAX_KEYS = cap  # read at trace time: a fresh jit per cap
        f = jax.jit(lambda *a: ax.ragged_paged_attention_xla(*a, sm_scale=d ** -0.5))
        f(*args).block_until_ready()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            f(*args).block_until_ready()
            best = min(best, time.perf_counter() - start)
        out[cap] = best * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()
    lines = ["| case | no cap ms | cap 128 keys ms | cap 64 keys ms (default) |", "|---|---|---|---|"]
    for name, case in CASES.items():
        r = bench(*case)
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in CAPS) + " |")
    load_after = os.getloadavg()
    text = "\n".join([
        f"device: {jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        "best of 7 calls each", "", *lines, "",
        "load average (1/5/15 min) before: " + ", ".join(f"{x:.2f}" for x in load_before),
        "load average (1/5/15 min) after:  " + ", ".join(f"{x:.2f}" for x in load_after), ""])
    print(text)
    if not args.no_append:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write("\n### scripts/bench_decode_block.py\n\n" + text)


if __name__ == "__main__":
    main()
