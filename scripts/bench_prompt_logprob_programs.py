"""What prompt logprobs cost at warm-up and in plain steps (demo model, `cpu` preset, the
persistent compilation cache off). Prints a markdown table for BENCHMARKS.md.

    PYTHONPATH=. python scripts/bench_prompt_logprob_programs.py [--repeats 7]

rows
  warm-up                 programs compiled and seconds, enable_prompt_logprobs on / off
                          (each in a fresh process, --warm-up-repeats times)
  compile body / plp(T)   seconds to compile one body and one prompt-logprob program per token
                          bucket (fresh jits, best of --compile-repeats, interleaved)
  plain decode step       ms per step: 1 and 8 greedy sequences, max_tokens=N (median of runs)
  prefill (+ plp=5)       16 x 200-token prompts, max_tokens=1, without / with prompt_logprobs=5
Run it on two commits (PYTHONPATH=<tree>) to compare them; the decode rows are the plain
step's time, which prompt-logprob support must not raise.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from jaxserve import LLM, SamplingParams
from jaxserve.worker import prompt_logprobs as _plp_module
from jaxserve.worker.input_batch import BodyInputs
from jaxserve.worker.model_runner import ModelRunner, _body, _no_cells

# the prompt-logprob program of the tree under test: this commit's, or the earlier full second body
PLP_NAME = "prompt_logprobs_program" if hasattr(_plp_module, "prompt_logprobs_program") else "body_with_prompt_logprobs"
plp_fn = getattr(_plp_module, PLP_NAME)

_warm: list[float] = []
_orig_warm_up = ModelRunner.warm_up


def _timed_warm_up(self) -> None:
    start = time.perf_counter()
    _orig_warm_up(self)
    _warm.append(time.perf_counter() - start)


ModelRunner.warm_up = _timed_warm_up


def median_time(fn, repeats: int, before=None) -> float:
    ts = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - start)
    return statistics.median(ts)


def compile_seconds(runner, t: int, repeats: int) -> tuple[float, float]:
    """Best-of-repeats seconds to lower and compile body(t) and the prompt-logprob program(t),
    each from a fresh jit (no cache), interleaved."""
    g, ps = runner.graphdef, runner.page_size
    s = runner.shapes.seqs(t)
    n = runner.batch.num_slots
    inp = BodyInputs(np.zeros(t, np.int32), np.zeros(s + 1, np.int32), np.full(s, n - 1, np.int32),
                     np.zeros(1, np.int32), np.zeros(runner.shapes.max_num_seqs, np.int32))
    targets = np.full(t, -1, np.int32)
    args = (runner.params, runner.kv_caches, runner.state, inp, _no_cells())
    if PLP_NAME == "prompt_logprobs_program":
        model = nnx.merge(g, runner.params)
        hidden = jax.ShapeDtypeStruct((t, model.cfg.hidden_size), model.dtype)  # the body's [T, D] rows
        plp = lambda: jax.jit(functools.partial(plp_fn, g, num_logprobs=runner.num_logprobs)).lower(  # noqa: E731
            runner.params, hidden, targets)
    else:
        plp = lambda: jax.jit(functools.partial(plp_fn, g, page_size=ps, num_logprobs=runner.num_logprobs),  # noqa: E731
                              donate_argnums=(1, 2)).lower(*args, targets)
    body = lambda: jax.jit(functools.partial(_body, g, page_size=ps), donate_argnums=(1, 2)).lower(*args)  # noqa: E731
    times = [[], []]
    for _ in range(repeats):
        for lower, ts in zip((body, plp), times):
            start = time.perf_counter()
            lower().compile()
            ts.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--compile-repeats", type=int, default=3)
    ap.add_argument("--warm-up-repeats", type=int, default=2)
    ap.add_argument("--warm-up-only", type=int, choices=(0, 1), help="print compile count and warm-up seconds")
    args = ap.parse_args()
    if args.warm_up_only is not None:
        llm = LLM(None, config="cpu", compilation_cache_dir="", enable_prompt_logprobs=bool(args.warm_up_only))
        print(llm.stats()["compile_count"], _warm[-1])
        return
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    load_before = uptime()
    rows = []
    warm_ups, counts = {False: [], True: []}, {}
    for _ in range(args.warm_up_repeats):  # each in a fresh process, off and on interleaved
        for enabled, ts in warm_ups.items():
            cmd = [sys.executable, __file__, "--warm-up-only", str(int(enabled))]
            count, secs = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
            ts.append(float(secs))
            counts[enabled] = count
    for enabled, ts in warm_ups.items():
        rows.append((f"warm-up, enable_prompt_logprobs={enabled}", f"{counts[enabled]} programs",
                     " / ".join(f"{t:.1f}" for t in ts) + " s"))
    llm = LLM(None, config="cpu", compilation_cache_dir="")
    warm = llm.stats()["compile_count"]
    for t in llm.engine.runner.shapes.token_buckets:
        body_s, plp_s = compile_seconds(llm.engine.runner, t, args.compile_repeats)
        rows.append((f"compile body({t})", "one program, best of repeats", f"{body_s:.2f} s"))
        rows.append((f"compile prompt-logprob program({t})", PLP_NAME, f"{plp_s:.2f} s"))
    rng = random.Random(0)
    prompts = [[rng.randrange(6, 1000) for _ in range(200)] for _ in range(16)]
    n = args.new_tokens
    for seqs in (1, 8):
        ps = [p[:32] for p in prompts[:seqs]]
        gen = lambda: llm.generate(ps, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),  # noqa: E731
                                   use_tqdm=False)
        gen()
        t = median_time(gen, args.repeats)
        rows.append((f"plain decode, {seqs} seq", f"{seqs} x {n} new", f"{1000 * t / n:.2f} ms / step"))
    reset = llm.engine.kv.reset_prefix_cache
    for plp in (None, 5):
        gen = lambda: llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0,  # noqa: E731
                                                           prompt_logprobs=plp), use_tqdm=False)
        t = median_time(gen, args.repeats, reset)
        rows.append((f"prefill, prompt_logprobs={plp}", "16 x 200 tokens", f"{t:.3f} s"))
    print("| run | work | result |")
    print("|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\ncompiles after warm-up: {llm.stats()['compile_count'] - warm}")
    print(f"uptime before: {load_before}\nuptime after:  {uptime()}")


if __name__ == "__main__":
    main()
