"""Prompt logprobs, beam search and best_of on the demo model (CPU): what each costs beside
its plain baseline, in the same run. Prints a markdown table for BENCHMARKS.md.

    PYTHONPATH=. python scripts/bench_beam_logprobs.py [--prompts 16] [--prompt-len 200]

rows
  prefill            the prompts, max_tokens=1, greedy                 (baseline)
  prefill + plp=5    the same with prompt_logprobs=5 (the prompt-logprob program)
  greedy decode      one prompt, max_tokens=N                          (baseline)
  beam search k      LLM.beam_search(beam_width=k, max_tokens=N), ignore_eos
  sample n           n samples, max_tokens=N                           (baseline)
  best_of b, n       n of b samples
Each row is the median of --repeats runs, interleaved with its baseline's; the prefix cache
is reset before every prefill run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time

from jaxserve import LLM, BeamSearchParams, SamplingParams


def timed(fns, repeats: int, before=None) -> list[float]:
    """Median wall time of each fn; the fns run interleaved (a, b, a, b, ...) so that load
    from other processes drifts over all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    llm = LLM(None, config="cpu")
    warm = llm.stats()["compile_count"]
    rng = random.Random(0)
    prompts = [[rng.randrange(6, 1000) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    reset = llm.engine.kv.reset_prefix_cache
    n_tok = args.new_tokens
    one = prompts[0][:64]
    rows = []

    def gen(ps, **kw):
        return lambda: llm.generate(ps, SamplingParams(**kw), use_tqdm=False)

    prefill_tokens = args.prompts * args.prompt_len
    base, plp = timed([gen(prompts, max_tokens=1, temperature=0.0),
                       gen(prompts, max_tokens=1, temperature=0.0, prompt_logprobs=5)], args.repeats, reset)
    rows.append(("prefill", f"{args.prompts} x {args.prompt_len} tokens", base, prefill_tokens / base, "1.00"))
    rows.append(("prefill + prompt_logprobs=5", "same", plp, prefill_tokens / plp, f"{plp / base:.2f}"))
    beam = lambda k: lambda: llm.beam_search([one], BeamSearchParams(beam_width=k, max_tokens=n_tok,  # noqa: E731
                                                                      ignore_eos=True))
    greedy, *beams = timed([gen([one], max_tokens=n_tok, temperature=0.0, ignore_eos=True), beam(2), beam(4)],
                           args.repeats)
    rows.append(("greedy decode", f"1 x {n_tok} new", greedy, n_tok / greedy, "1.00"))
    for k, t in zip((2, 4), beams):
        rows.append((f"beam search k={k}", f"1 x {n_tok} new, {k} beams", t, n_tok / t, f"{t / greedy:.2f}"))
    sample, best = timed([gen([one], n=2, max_tokens=n_tok, temperature=1.0, seed=1, ignore_eos=True),
                          gen([one], n=2, best_of=6, max_tokens=n_tok, temperature=1.0, seed=1, ignore_eos=True)],
                         args.repeats)
    rows.append(("sample n=2", f"2 x {n_tok} new", sample, 2 * n_tok / sample, "1.00"))
    rows.append(("best_of=6, n=2", f"6 x {n_tok} sampled, 2 returned", best, 6 * n_tok / best,
                 f"{best / sample:.2f}"))
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print("| run | work | wall s (median) | tokens / s | x its baseline |")
    print("|---|---|---|---|---|")
    for name, work, t, tps, ratio in rows:
        print(f"| {name} | {work} | {t:.3f} | {tps:.0f} | {ratio} |")
    print(f"\ncompiles after warm-up: {llm.stats()['compile_count'] - warm}")
    print(f"uptime before: {load_before}\nuptime after:  {load_after}")


if __name__ == "__main__":
    main()
