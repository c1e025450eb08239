"""8-bit KV cache against a 16-bit one: greedy agreement, throughput, pages, scale granularity.

One run, one model, one workload (scripts/benchmark_throughput.py's: random prompts, greedy,
EOS ignored; with --prompts-from, the same prompt and output lengths but each prompt a window
of real text, e.g. the held-out text scripts/train_tiny_lm.py writes beside its model), the
first --kv-cache-dtypes entry (default bfloat16) the baseline:

  1. Engine runs, one fresh engine per kv_cache_dtype (warm-up excluded): output tokens/s,
     KV bytes per token, pages for the preset's KV budget, and how many of the baseline's
     greedy tokens each run reproduces, position by position (free-running: after the
     first differing token the two continuations are different texts, so this is strict),
     with the requests whose whole output is identical.
  2. Teacher-forced: every prompt + the baseline's output through the model once per
     kv_cache_dtype (models.single_sequence, the same paged forward pass); over the output
     positions, the top-1 agreement of the next-token argmax with the baseline's, the same
     over the positions whose baseline top-1 leads its runner-up by >= MARGIN nats (not a
     near-tie), the largest such lead a run overturned, and the mean KL(baseline || run) of
     the next-token distributions. This is the per-step effect of the cache's rounding,
     without divergence compounding; the entropy and margins say how near-tied the model's
     choices are (a random-weight model's are: its logits are nearly flat).
  3. Scale granularity, on the K/V the model really wrote (the float32 cache of part 2) and
     on the same with 1% of the token rows made 20x larger (outlier / sink tokens): relative
     RMS error of the dequantized values with a scale per token and kv head (what the cache
     uses) against one scale per page and kv head, and what each costs in bytes per token.

Appends the tables, with the load average, to --out (BENCHMARKS.md).

    python scripts/bench_kv_quant.py                               # demo model, CPU preset
    python scripts/bench_kv_quant.py --model DIR --kv-cache-dtypes bfloat16,int8,fp8_e4m3,auto
    python scripts/bench_kv_quant.py --model /tmp/tiny-lm --prompts-from /tmp/tiny-lm/heldout.txt \
        --kv-cache-dtypes bfloat16,int8,fp8_e4m3              # a trained model (train_tiny_lm.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark_throughput as bt  # noqa: E402

MARGIN = 0.05  # nats: a baseline top-1 this far above its runner-up is not a near-tie


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the demo model)")
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"))
    p.add_argument("--dtype", default=None, help="weights and activations (default: the config's)")
    p.add_argument("--kv-cache-dtypes", default="bfloat16,int8,fp8_e4m3,auto",
                   help="comma list; the first is the baseline ('auto': the model's dtype)")
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=8 << 20,
                   help="KV budget every run gets (the preset's num_pages is dropped), so the page counts show what "
                        "a byte budget holds; 0: keep the preset's num_pages")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--min-output", type=int, default=32)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts-from", default=None,
                   help="a text file, or a directory of .py/.md/.txt/.rst files: each prompt is a window of its "
                        "tokens (the model's tokenizer) at a random offset, same lengths as the random workload")
    p.add_argument("--teacher-forced", type=int, default=32, help="requests for part 2 (0: skip parts 2 and 3)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file the tables are appended to "
                   "('' : print only)")
    return p.parse_args(argv)


def text_workload(work: list, path: str, model_dir: Path, seed: int) -> tuple[list, int]:
    """`work` with each prompt replaced by a window of as many tokens of the text at `path` (a
    file, or a directory's text files in name order), starting at a random offset (seed + 1);
    and the text's token count."""
    from transformers import AutoTokenizer

    src = Path(path)
    files = [src] if src.is_file() else sorted(f for f in src.rglob("*")
                                               if f.suffix in (".py", ".md", ".txt", ".rst") and f.is_file())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [t for f in files for t in tokenizer.encode(f.read_text(encoding="utf-8"), add_special_tokens=False,
                                                          verbose=False)]
    longest = max(len(p) for p, _ in work)
    if len(ids) <= longest:
        raise SystemExit(f"--prompts-from {path}: {len(ids)} tokens, fewer than the longest prompt ({longest})")
    rng = random.Random(seed + 1)
    out = []
    for prompt, n in work:
        start = rng.randrange(len(ids) - len(prompt))
        out.append((ids[start:start + len(prompt)], n))
    return out, len(ids)


def model_note(model_dir: Path) -> str:
    """What training.json (scripts/train_tiny_lm.py) says about a trained model; '' without one."""
    try:
        t = json.loads((model_dir / "training.json").read_text())
    except (OSError, ValueError):
        return ""
    c = t["corpus"]
    return (f" Trained by `{t['script']}`: {t['params'] / 1e6:.2f}M parameters, {t['steps']} steps of "
            f"{t['args']['batch']} x {t['args']['seq_len']} tokens ({t['tokens_seen'] / 1e6:.2f}M tokens seen) on "
            f"{c['train_tokens'] / 1e6:.2f}M tokens of {c['train_files']} files under {', '.join(c['roots'])}; "
            f"held-out loss {t['heldout_loss']:.3f} nats/token ({c['heldout_files']} held-out files, "
            f"{c['split']}).")


def positional_agreement(base: list[list[int]], other: list[list[int]]) -> tuple[int, int, int]:
    """(positions with the same token, positions, requests with identical outputs)."""
    same = sum(int(a == b) for x, y in zip(base, other) for a, b in zip(x, y))
    return same, sum(len(x) for x in base), sum(x == y for x, y in zip(base, other))


def divergence_margins(base: list[list[int]], other: list[list[int]], margin: np.ndarray) -> list[float]:
    """For each of the first len(base) requests whose free-running output parts from the baseline's:
    the baseline's top-1 lead (`margin`, over the requests' output positions concatenated) where it
    parts. Up to there both ran the same tokens, so that is the choice the cache's rounding flipped."""
    out, offset = [], 0
    for x, y in zip(base, other):
        k = next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
        if k is not None:
            out.append(float(margin[offset + k]))
        offset += len(x)
    return out


def teacher_forced_logits(args, seqs: list[tuple[list[int], int]], kv_dtype_name: str):
    """For each (ids, prompt_len): log-softmax of the next-token logits at the output positions
    [prompt_len - 1, len(ids) - 1), float64 [n_out, V], with a cache of kv_dtype_name; and the
    cache [L, P, B, 2K, H] of the last sequence as numpy when it is a float cache (for part 3)."""
    import jax
    import jax.numpy as jnp

    from jaxserve.kernels.kv_quant import kv_cache_dtype
    from jaxserve.models.decoder import init_kv_caches
    from jaxserve.models.loader import load_model, resolve_dtype
    from jaxserve.models.single_sequence import SingleSequenceRunner

    from jaxserve.config import EngineConfig

    cfg = EngineConfig.load(args.config, dtype=args.dtype)
    loaded = load_model(args.model, dtype=cfg.dtype, attention_backend=args.attention_backend or cfg.attention_backend)
    width = -(-max(len(ids) for ids, _ in seqs) // 16) * 16     # one padded length: one compile
    runner = SingleSequenceRunner(loaded.model, max_len=width)
    kv_dtype = (loaded.dtype if kv_dtype_name == "auto"
                else kv_cache_dtype(kv_dtype_name) or resolve_dtype(kv_dtype_name))
    out, last_cache = [], None
    for ids, prompt_len in seqs:
        runner.kv_caches = init_kv_caches(loaded.config, runner.max_pages + 1, runner.page_size, kv_dtype)
        # Pad at the end: causal attention, so the real positions never see the padding.
        logits = runner.full_logits(list(ids) + [ids[-1]] * (width - len(ids)))[prompt_len - 1:len(ids) - 1]
        out.append(np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64))
        last_cache = runner.kv_caches
    if not isinstance(last_cache, jax.Array):     # an 8-bit cache (QuantizedKV)
        last_cache = None
    del runner, loaded
    bt._release_jax()
    return out, (None if last_cache is None else np.asarray(last_cache))


def granularity(cache: np.ndarray, page_size: int, seed: int) -> list[tuple[str, int, float, float]]:
    """Relative RMS error of int8 quantization of the real K/V rows of `cache` [L, P, B, 2K, H],
    per token-head scale vs per page-head scale; on the rows as written and with 1% of the token
    rows x20. -> [(scheme, scale bytes per token-head row, err, err with outliers)]."""
    rows = cache.reshape(-1, page_size, cache.shape[-2], cache.shape[-1])     # [L*P, B, 2K, H]
    rows = rows[np.abs(rows).reshape(rows.shape[0], -1).max(axis=1) > 0]     # pages that were written
    rng = np.random.default_rng(seed)
    outliers = rows.copy()
    hit = rng.random(rows.shape[:2]) < 0.01                                   # [pages, B]: whole token rows
    outliers[hit] *= 20.0

    def err(x: np.ndarray, per_page: bool) -> float:
        amax = np.abs(x).max(axis=(1, 3) if per_page else 3, keepdims=True)  # [pages, 1|B, 2K, 1]
        scale = np.where(amax > 0, amax / 127.0, 1.0)
        deq = np.clip(np.rint(x / scale), -127, 127) * scale
        return float(np.sqrt(np.mean((deq - x) ** 2)) / np.sqrt(np.mean(x ** 2)))

    return [("scale per token and kv head (the cache's)", 4.0, err(rows, False), err(outliers, False)),
            ("scale per page and kv head", 4.0 / page_size, err(rows, True), err(outliers, True))]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from jaxserve.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    from jaxserve.models.loader import read_hf_config, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    hf = read_hf_config(model_dir)
    config_name = args.config
    if args.kv_cache_memory_bytes:
        from jaxserve.config import read_yaml

        preset = read_yaml(args.config)
        preset.pop("num_pages", None)
        args.config = {**preset, "kv_cache_memory_bytes": args.kv_cache_memory_bytes}
        config_name = f"{config_name} without num_pages, kv_cache_memory_bytes {args.kv_cache_memory_bytes}"
    work = bt.workload(args, int(hf["vocab_size"]))
    prompts = f"random token ids, seed {args.seed}"
    title = "8-bit KV cache"
    note = model_note(model_dir)
    if note:
        loss = json.loads((model_dir / "training.json").read_text())["heldout_loss"]
        title += f", trained tiny model (held-out loss {loss:.2f} nats/token)"
    if args.prompts_from:
        work, n_text = text_workload(work, args.prompts_from, model_dir, args.seed)
        prompts = (f"each prompt a window of `{args.prompts_from}` ({n_text} tokens) at a random offset, lengths "
                   f"seed {args.seed}, offsets seed {args.seed + 1}")
        title += ", prompts from held-out text" if "heldout" in Path(args.prompts_from).name else ", prompts from text"
    names = [n.strip() for n in args.kv_cache_dtypes.split(",") if n.strip()]
    runs = []
    for name in names:
        args.kv_cache_dtype = name
        print(f"[bench_kv_quant] engine, kv_cache_dtype {name}", file=sys.stderr, flush=True)
        runs.append(bt.run_jaxserve(args, work, None))
    base = runs[0]
    lines = [f"### {title} ({datetime.date.today().isoformat()}, {bt.machine()}, commit {bt.git_commit()})", "",
             f"Model: `{base['model_dir']}` (weights {base['dtype']}), config `{config_name}`, attention "
             f"`{base['backend']}`.{note} Workload: {len(work)} requests, prompts {args.min_prompt}-{args.max_prompt} "
             f"tokens, outputs {args.min_output}-{args.max_output} ({prompts}, greedy, EOS ignored). "
             f"Baseline: kv_cache_dtype {names[0]}. Positions: free-running greedy tokens equal to the baseline's at "
             "the same position (strict: after a first difference the continuations differ). Load average 1/5/15 "
             "min, before the engine was built -> after its timed run.", "",
             "| kv_cache_dtype | KV B/token | pages | preemptions | wall s | output tok/s | positions = baseline "
             "| identical requests | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        same, total, whole = positional_agreement(base["token_ids"], r["token_ids"])
        lines.append(f"| {r['kv_cache_dtype']} | {r['kv_bytes_per_token']} | {r['num_pages']} | {r['preemptions']} | "
                     f"{r['elapsed']:.1f} | "
                     f"{r['tokens'] / r['elapsed']:.1f} | {same}/{total} = {100 * same / total:.1f}% | "
                     f"{whole}/{len(work)} | {bt._load(r)} |")
    lines.append("")
    if args.teacher_forced > 0:
        n = min(args.teacher_forced, len(work))
        seqs = [(list(p) + list(out), len(p)) for (p, _), out in zip(work[:n], base["token_ids"][:n])]
        load_before = bt.load_avg()
        logps = {}
        for name in names:
            print(f"[bench_kv_quant] teacher-forced, kv_cache_dtype {name}", file=sys.stderr, flush=True)
            logps[name], _ = teacher_forced_logits(args, seqs, name)
        _, f32_cache = teacher_forced_logits(args, seqs[-1:], "float32")
        ref = np.concatenate(logps[names[0]])                   # [positions, V] log-probs
        top2 = np.sort(ref, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]                        # baseline's top-1 minus top-2 log-prob
        entropy = -(np.exp(ref) * ref).sum(-1)
        wide = margin >= MARGIN
        lines += [f"Teacher-forced, the first {n} requests (prompt + the baseline's output, one forward pass each; "
                  f"{len(ref)} output positions; load avg "
                  f"{bt._load(dict(load_before=load_before, load_after=bt.load_avg()))}). How peaked the baseline's "
                  f"next-token distribution is: entropy {np.mean(entropy):.2f} nats (uniform: {np.log(ref.shape[1]):.2f}), "
                  f"top-1 minus top-2 log-prob median {np.median(margin):.2e}, {100 * np.mean(~wide):.1f}% of the "
                  f"positions below {MARGIN:g}:", "",
                  "| kv_cache_dtype | next-token top-1 = baseline | where the baseline's margin >= "
                  f"{MARGIN:g} | largest margin flipped | mean KL(baseline \\|\\| run) nats | free-running: requests "
                  "parting from the baseline, its margin where they part (median, max) |", "|---|---|---|---|---|---|"]
        for (name, lp), run in zip(logps.items(), runs):
            parts = divergence_margins(base["token_ids"][:n], run["token_ids"][:n], margin)
            parted = f"{len(parts)}/{n}" + (f": {np.median(parts):.2e}, {max(parts):.2e}" if parts else "")
            lp = np.concatenate(lp)
            same = ref.argmax(-1) == lp.argmax(-1)
            kl = float((np.exp(ref) * (ref - lp)).sum(-1).mean())
            flipped = f"{margin[~same].max():.2e}" if (~same).any() else "-"
            lines.append(f"| {name} | {same.sum()}/{len(same)} = {100 * same.mean():.2f}% | {same[wide].sum()}/"
                         f"{wide.sum()} = {100 * same[wide].mean():.2f}% | {flipped} | {kl:.2e} | {parted} |")
        lines.append("")
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
        lines += [f"Scale granularity (int8), on the float32 K/V the model wrote for the last teacher-forced "
                  f"sequence (head_dim {head_dim}, pages of 16), and on the same with 1% of the token rows x20:", "",
                  "| scales | value+scale bytes per K or V row | head_dim 128 | relative RMS error | with 1% outlier "
                  "tokens x20 |", "|---|---|---|---|---|"]
        for scheme, scale_bytes, e, e_out in granularity(f32_cache, 16, args.seed):
            lines.append(f"| {scheme} | {head_dim + scale_bytes:g} (bf16: {2 * head_dim}) | {128 + scale_bytes:g} "
                         f"(bf16: 256) | {e:.2e} | {e_out:.2e} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"[bench_kv_quant] done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    sys.exit(code)
