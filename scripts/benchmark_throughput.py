"""Offline throughput: jaxserve's engine vs Hugging Face transformers on the same weights.

A synthetic workload (prompt and output lengths drawn from a fixed seed, random token ids,
EOS ignored so every request produces exactly its output length) runs through:
  1. jaxserve `LLM.generate` (continuous batching, paged KV cache; warm-up excluded);
  2. transformers `generate`, one request at a time (on the first --hf-single requests);
  3. transformers `generate` in static batches of --hf-batch-size with left padding.
Prints requests/s and output tokens/s for each and the ratios, the KV memory waste of our
engine (allocated page slots vs tokens held, averaged over steps) and its compile count,
then appends the table to BENCHMARKS.md with the date and machine.

    python scripts/benchmark_throughput.py                       # demo model, CPU preset
    python scripts/benchmark_throughput.py --model DIR --config configs/... --num-requests 256
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def workload(args, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.num_requests):
        p = rng.randint(args.min_prompt, args.max_prompt)
        o = rng.randint(args.min_output, args.max_output)
        out.append(([rng.randrange(10, vocab) for _ in range(p)], o))
    return out


def run_jaxserve(args, work) -> dict:
    from jaxserve import LLM, SamplingParams

    overrides = {k: v for k, v in dict(num_pages=args.num_pages, dtype=args.dtype,
                                       max_num_seqs=args.max_num_seqs).items() if v is not None}
    t0 = time.perf_counter()
    llm = LLM(args.model, config=args.config, **overrides)
    warm = time.perf_counter() - t0
    engine = llm.engine
    compiles_after_warmup = engine.stats()["compile_count"]
    page = engine.config.page_size
    for i, (prompt, n) in enumerate(work):
        engine.add_request(f"b{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    slots = held = 0
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        generated += sum(len(c.token_ids) for o in outs for c in o.outputs)
        for req in engine.scheduler.running:
            slots += len(engine.kv.get_block_table(req.request_id)) * page
            held += req.num_computed_tokens
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    return dict(name="jaxserve (continuous batching, paged KV)", elapsed=elapsed, requests=len(work),
                tokens=generated, waste=1 - held / max(slots, 1), compiles=stats["compile_count"],
                new_compiles=stats["compile_count"] - compiles_after_warmup, warmup=warm,
                preemptions=stats["num_preemptions"], model_dir=engine.model_path)


def load_hf(model_dir: str, dtype: str):
    import torch
    import transformers

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), device


def run_hf_single(model, device, work) -> dict:
    import torch

    generated = 0
    start = time.perf_counter()
    with torch.no_grad():
        for prompt, n in work:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
            generated += out.shape[1] - len(prompt)
    return dict(name="transformers, one request at a time", elapsed=time.perf_counter() - start,
                requests=len(work), tokens=generated)


def run_hf_static(model, device, work, batch_size: int) -> dict:
    """Static batches, left padded; a batch runs until its longest output; only the tokens
    each request asked for count as output."""
    import torch

    useful = 0
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(work), batch_size):
            batch = work[b:b + batch_size]
            width = max(len(p) for p, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, _) in enumerate(batch):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            n = max(o for _, o in batch)
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            useful += sum(o for _, o in batch)
    return dict(name=f"transformers, static batches of {batch_size} (left padded)",
                elapsed=time.perf_counter() - start, requests=len(work), tokens=useful)


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    return f"{dev.platform}:{dev.device_kind} x{jax.device_count()}, host {platform.machine()} ({os.cpu_count()} CPUs)"


def table(args, results: list[dict], ours: dict) -> str:
    lines = [
        f"### Throughput ({datetime.date.today().isoformat()}, {machine()})",
        "",
        f"Model: `{ours['model_dir']}` ({args.dtype or 'config dtype'}), config `{args.config}`. Workload: "
        f"{args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, outputs "
        f"{args.min_output}-{args.max_output} tokens (seed {args.seed}, EOS ignored). The one-at-a-time "
        f"baseline ran the first {args.hf_single} requests.",
        "",
        "| engine | requests | wall s | requests/s | output tokens/s | jaxserve speed-up (tok/s) |",
        "|---|---|---|---|---|---|",
    ]
    ours_tps = ours["tokens"] / ours["elapsed"]
    for r in results:
        tps = r["tokens"] / r["elapsed"]
        lines.append(f"| {r['name']} | {r['requests']} | {r['elapsed']:.1f} | {r['requests'] / r['elapsed']:.2f} "
                     f"| {tps:.1f} | {ours_tps / tps:.2f}x |" if r is not ours else
                     f"| {r['name']} | {r['requests']} | {r['elapsed']:.1f} | {r['requests'] / r['elapsed']:.2f} "
                     f"| {tps:.1f} | 1.00x |")
    lines += ["", f"jaxserve: KV memory waste {100 * ours['waste']:.1f}% (allocated page slots not holding a token, "
              f"averaged over steps), {ours['compiles']} compilations at warm-up ({ours['warmup']:.1f} s), "
              f"{ours['new_compiles']} during the run, {ours['preemptions']} preemptions.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model directory (default: the demo model)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"))
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--min-output", type=int, default=32)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-single", type=int, default=16, help="requests for the one-at-a-time baseline")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    if args.model is None:
        from jaxserve.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    from models.loader import read_hf_config, resolve_model_dir

    vocab = int(read_hf_config(resolve_model_dir(args.model))["vocab_size"])
    work = workload(args, vocab)
    ours = run_jaxserve(args, work)
    results = [ours]
    if not args.no_hf:
        model, device = load_hf(ours["model_dir"], args.dtype or "float32")
        results.append(run_hf_single(model, device, work[:args.hf_single]))
        results.append(run_hf_static(model, device, work, args.hf_batch_size))
    text = table(args, results, ours)
    print(text)
    with open(args.out, "a") as f:
        f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
