"""Offline throughput: jaxserve's engine vs Hugging Face transformers (and vLLM) on the same weights.

A synthetic workload (prompt and output lengths drawn from a fixed seed, random token ids,
greedy, EOS ignored so every request produces exactly its output length) runs through:
  1. jaxserve `LLM` (continuous batching, paged KV cache; warm-up excluded), once per
     --max-model-len value, each a fresh engine, so one run shows what max_model_len costs;
  2. transformers `generate`, one request at a time (on the first --hf-single requests);
  3. transformers `generate` in static batches of --hf-batch-size with left padding;
  4. vLLM's offline `LLM` when --vllm-python names the python of a venv that has vLLM
     (scripts/vllm_peer.py runs there as a subprocess, on the same model directory and the
     same token ids; see BENCHMARKS.md, "How to make the vLLM CPU venv").
Prints requests/s and output tokens/s for each, the ratios to the first jaxserve run, the
ratio between the jaxserve runs, the load average before and after each run (the machine
may be shared) and the git commit, then appends the table to --out (BENCHMARKS.md).

    python scripts/benchmark_throughput.py                       # demo model, CPU preset
    python scripts/benchmark_throughput.py --model DIR --config configs/cpu-throughput.yaml \\
        --max-model-len 512,8192 --no-hf                         # what max_model_len costs
    python scripts/benchmark_throughput.py --model DIR --config configs/cpu-throughput.yaml \\
        --num-requests 128 --max-prompt 512 --max-output 256 --max-model-len 1024 \\
        --vllm-python /work/vllm-venv/bin/python                 # against transformers and vLLM
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "scripts" / "vllm_peer.py"

Work = list[tuple[list[int], int]]  # (prompt token ids, output length) per request


def workload(args, vocab: int) -> Work:
    """--workload random: random token ids; repeat: each prompt is a random 4-16 token phrase
    repeated to its length (copying / editing text: what n-gram speculation feeds on)."""
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.num_requests):
        p = rng.randint(args.min_prompt, args.max_prompt)
        o = rng.randint(args.min_output, args.max_output)
        if getattr(args, "workload", "random") == "repeat":
            phrase = [rng.randrange(10, vocab) for _ in range(rng.randint(4, 16))]
            out.append(((phrase * (p // len(phrase) + 1))[:p], o))
        else:
            out.append(([rng.randrange(10, vocab) for _ in range(p)], o))
    return out


def load_avg() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())


def git_commit() -> str:
    """HEAD's short hash, '+dirty' when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def parse_lens(text: str | None) -> list[int | None]:
    """'512,8192' -> [512, 8192]; None -> [None] (the config's max_model_len)."""
    if not text:
        return [None]
    try:
        lens = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--max-model-len must be a comma list of integers, got {text!r}") from None
    if not lens or min(lens) <= 0:
        raise SystemExit(f"--max-model-len must be a comma list of positive integers, got {text!r}")
    return lens


def run_jaxserve(args, work: Work, max_model_len: int | None) -> dict:
    """One fresh engine; the timed part starts after warm-up, with every request queued."""
    import numpy as np

    from jaxserve import LLM, SamplingParams
    from jaxserve.kernels.backend import resolve_backend

    overrides = {k: v for k, v in dict(num_pages=args.num_pages, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                       max_num_batched_tokens=args.max_num_batched_tokens,
                                       max_model_len=max_model_len,
                                       attention_backend=args.attention_backend,
                                       kv_cache_dtype=getattr(args, "kv_cache_dtype", None),
                                       speculative_config=getattr(args, "speculative_config", None),
                                       ).items() if v is not None}
    load_before = load_avg()
    t0 = time.perf_counter()
    llm = LLM(args.model, config=args.config, **overrides)
    warm = time.perf_counter() - t0
    engine = llm.engine
    compiles_after_warmup = engine.stats()["compile_count"]
    page = engine.config.page_size
    for i, (prompt, n) in enumerate(work):
        engine.add_request(f"b{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    slots = held = 0
    outputs: dict[str, list[int]] = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(t for c in o.outputs for t in c.token_ids)
        for req in engine.scheduler.running:
            slots += len(engine.kv.get_block_table(req.request_id)) * page
            held += req.num_computed_tokens
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    cfg = engine.config
    if max_model_len is not None and engine.max_model_len != max_model_len:
        print(f"[benchmark] warning: max_model_len {max_model_len} was clamped to the model's "
              f"{engine.max_model_len}", file=sys.stderr)
    spec = cfg.speculative_config
    name = "jaxserve (continuous batching, paged KV)"
    if spec is not None:
        name = f"jaxserve, {spec.method} speculation k={spec.num_speculative_tokens}"
    result = dict(name=name, engine="jaxserve", elapsed=elapsed, spec=spec is not None,
                  spec_drafts=stats.get("spec_num_drafts", 0), spec_draft_tokens=stats.get("spec_num_draft_tokens", 0),
                  spec_accepted=stats.get("spec_num_accepted_tokens", 0),
                  requests=len(work), tokens=sum(len(t) for t in outputs.values()),
                  token_ids=[outputs.get(f"b{i}", []) for i in range(len(work))],
                  max_model_len=engine.max_model_len, dtype=str(np.dtype(engine.dtype)), waste=1 - held / max(slots, 1),
                  compiles=stats["compile_count"], new_compiles=stats["compile_count"] - compiles_after_warmup,
                  warmup=warm, preemptions=stats["num_preemptions"], model_dir=str(engine.model_path),
                  backend=resolve_backend(cfg.attention_backend), max_num_seqs=cfg.max_num_seqs,
                  max_num_batched_tokens=cfg.max_num_batched_tokens, num_pages=engine.kv.num_total_pages,
                  kv_cache_dtype=cfg.kv_cache_dtype, kv_bytes_per_token=stats.get("kv_bytes_per_token"),
                  load_before=load_before, load_after=load_avg())
    del llm, engine
    _release_jax()
    return result


def _release_jax() -> None:
    """Drops the last engine's compiled programs and buffers before the next one starts."""
    import jax

    gc.collect()
    jax.clear_caches()
    gc.collect()


def load_hf(model_dir: str, dtype: str):
    import torch
    import transformers

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), device


def run_hf_single(model, device, work: Work) -> dict:
    import torch

    generated = 0
    load_before = load_avg()
    start = time.perf_counter()
    with torch.no_grad():
        for prompt, n in work:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
            generated += out.shape[1] - len(prompt)
    return dict(name="transformers, one request at a time", engine="hf", elapsed=time.perf_counter() - start,
                requests=len(work), tokens=generated, load_before=load_before, load_after=load_avg())


def run_hf_static(model, device, work: Work, batch_size: int) -> dict:
    """Static batches, left padded; a batch runs until its longest output; only the tokens
    each request asked for count as output."""
    import torch

    useful = 0
    load_before = load_avg()
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
    return dict(name=f"transformers, static batches of {batch_size} (left padded)", engine="hf",
                elapsed=time.perf_counter() - start, requests=len(work), tokens=useful,
                load_before=load_before, load_after=load_avg())


def run_vllm(args, work: Work, model_dir: str, max_model_len: int, dtype: str) -> dict:
    """scripts/vllm_peer.py in the --vllm-python interpreter; the workload goes in and the
    result comes back as JSON files. A failure becomes a row that says why."""
    name = "vLLM CPU (offline LLM.generate)"
    with tempfile.TemporaryDirectory(prefix="jaxserve-vllm-") as tmp:
        wl, res, log_path = Path(tmp) / "workload.json", Path(tmp) / "result.json", Path(tmp) / "peer.log"
        wl.write_text(json.dumps({"prompts": [p for p, _ in work], "max_tokens": [n for _, n in work]}))
        cmd = [args.vllm_python, str(PEER), "--model", model_dir, "--workload", str(wl), "--out", str(res),
               "--max-model-len", str(max_model_len), "--dtype", dtype, "--seed", str(args.seed),
               "--engine-args", args.vllm_engine_args]
        print(f"[benchmark] vLLM peer: {' '.join(cmd)}", file=sys.stderr, flush=True)
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.vllm_timeout).returncode
            except (OSError, subprocess.TimeoutExpired) as e:
                rc, why = -1, f"{type(e).__name__}: {e}"
            else:
                why = f"exit status {rc}"
        if rc != 0 or not res.is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            print(f"[benchmark] vLLM peer failed ({why}); last lines:\n  " + "\n  ".join(tail), file=sys.stderr)
            return dict(name=name, engine="vllm", failed=f"{why}: {tail[-1] if tail else 'no output'}",
                        requests=len(work), max_model_len=max_model_len)
        peer = json.loads(res.read_text())
        cores = re.search(r"local_rank=0, core ids=(\[[0-9, ]*\])", log_path.read_text(errors="replace"))
    peer["worker_cores"] = cores.group(1) if cores else "?"  # where vLLM's worker bound its OpenMP threads
    return dict(peer, name=name + f", vllm {peer.get('vllm_version', '?')}", engine="vllm", max_model_len=max_model_len)


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    return f"{dev.platform}:{dev.device_kind} x{jax.device_count()}, host {platform.machine()} ({os.cpu_count()} CPUs)"


def same_outputs(ours: dict, other: dict) -> str:
    """How many requests got jaxserve's greedy tokens (first token / whole output)."""
    a, b = ours["token_ids"], other.get("token_ids")
    if not b or len(a) != len(b):
        return ""
    first = sum(bool(x) and bool(y) and x[0] == y[0] for x, y in zip(a, b))
    whole = sum(x == y for x, y in zip(a, b))
    return f"; same greedy tokens as jaxserve: first token {first}/{len(a)}, whole output {whole}/{len(a)}"


def _load(r: dict) -> str:
    fmt = lambda t: "/".join(f"{x:.2f}" for x in t)  # noqa: E731
    return f"{fmt(r['load_before'])} -> {fmt(r['load_after'])}" if "load_before" in r else "-"


def _spec_note(r: dict, ours: dict) -> str:
    """Speculative decoding's counts of a jaxserve row ('' without speculation)."""
    if not r.get("spec"):
        return ""
    same = "identical to" if r["token_ids"] == ours["token_ids"] else "DIFFERENT from"
    return (f" Speculation: {r['spec_drafts']} verification steps, {r['spec_draft_tokens']} proposals, "
            f"{r['spec_accepted']} accepted (acceptance rate "
            f"{r['spec_accepted'] / max(r['spec_draft_tokens'], 1):.3f}, "
            f"mean acceptance length {1 + r['spec_accepted'] / max(r['spec_drafts'], 1):.2f} tokens per verification); "
            f"greedy tokens {same} the first row's.")


def table(args, results: list[dict]) -> str:
    ours = next(r for r in results if r["engine"] == "jaxserve")
    ours_tps = ours["tokens"] / ours["elapsed"]
    fits = args.max_prompt + args.max_output
    lines = [
        f"### Throughput ({datetime.date.today().isoformat()}, {machine()}, commit {git_commit()})",
        "",
        f"Model: `{ours['model_dir']}` ({ours['dtype']}), config `{args.config}`. Workload: "
        f"{args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, outputs "
        f"{args.min_output}-{args.max_output} tokens ("
        + ("prompts repeating a random 4-16 token phrase" if args.workload == "repeat" else "random token ids")
        + f", seed {args.seed}, greedy, EOS ignored); "
        f"every request fits {fits} tokens, so it is the same workload at each max_model_len >= {fits}. "
        + (f"The one-at-a-time baseline ran the first {args.hf_single} requests. "
           if any(r["name"].endswith("one request at a time") for r in results) else "")
        + f"Speed-up: the first jaxserve "
        f"row's output tokens/s over the row's. Load average: 1/5/15 min, before the engine was built -> "
        f"after its timed run.",
        "",
        "| engine | max_model_len | requests | wall s | requests/s | output tokens/s | jaxserve speed-up "
        "| load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['name']} | {r['max_model_len']} | {r['requests']} | failed: {r['failed']} "
                         f"| | | | - |")
            continue
        tps = r["tokens"] / r["elapsed"]
        lines.append(f"| {r['name']} | {r.get('max_model_len', '-')} | {r['requests']} | {r['elapsed']:.1f} "
                     f"| {r['requests'] / r['elapsed']:.2f} | {tps:.1f} | {ours_tps / tps:.2f}x | {_load(r)} |")
    lines.append("")
    for r in results:
        if r["engine"] == "jaxserve":
            lines.append(f"- jaxserve at max_model_len {r['max_model_len']}: attention `{r['backend']}`, "
                         f"max_num_seqs {r['max_num_seqs']}, token budget {r['max_num_batched_tokens']}, "
                         f"{r['num_pages']} KV pages (kv_cache_dtype {r.get('kv_cache_dtype', 'auto')}, "
                         f"{r.get('kv_bytes_per_token')} B per token); KV memory waste {100 * r['waste']:.1f}% (allocated page "
                         f"slots not holding a token, averaged over steps), {r['compiles']} compilations at "
                         f"warm-up ({r['warmup']:.1f} s), {r['new_compiles']} during the run, {r['preemptions']} "
                         f"preemptions." + _spec_note(r, ours))
        elif r["engine"] == "vllm" and "failed" not in r:
            env = ", ".join(f"{k}={v}" for k, v in r.get("cpu_env", {}).items())
            lines.append(f"- vLLM: torch {r.get('torch_version', '?')}, worker threads on cores "
                         f"{r.get('worker_cores', '?')} ({env}), LD_PRELOAD "
                         f"`{r.get('preload') or '-'}`, max_num_seqs {r.get('max_num_seqs', '?')}, token budget "
                         f"{r.get('max_num_batched_tokens', '?')}, start-up and warm-up {r.get('startup', 0):.1f} s"
                         f"{same_outputs(ours, r)}.")
    runs = [r for r in results if r["engine"] == "jaxserve"]
    for r in runs[1:]:
        ratio = (r["tokens"] / r["elapsed"]) / ours_tps
        if r.get("spec") and not ours.get("spec"):
            lines.append(f"- jaxserve output tokens/s with speculation / without: {ratio:.3f}.")
            continue
        lines.append(f"- jaxserve output tokens/s at max_model_len {r['max_model_len']} / at {ours['max_model_len']}: "
                     f"{ratio:.3f} ({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10%).")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model directory (default: the demo model)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu.yaml"))
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-model-len", default=None,
                        help="comma list, e.g. 512,8192: one fresh jaxserve engine per value (default: the config's)")
    parser.add_argument("--attention-backend", default=None, help="default: the config's attention_backend")
    parser.add_argument("--kv-cache-dtype", default=None, help="auto | float32 | bfloat16 | float16 | int8 | fp8_e4m3 "
                        "(default: the config's); scripts/bench_kv_quant.py compares several in one run")
    parser.add_argument("--speculative-config", default=None,
                        help="JSON object, vLLM's shape (method, num_speculative_tokens, ...); default: off")
    parser.add_argument("--compare-speculative", action="store_true",
                        help="with --speculative-config: a jaxserve run without speculation first (the baseline row)")
    parser.add_argument("--workload", choices=("random", "repeat"), default="random",
                        help="repeat: prompts repeat a short phrase (n-gram speculation's case)")
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--min-output", type=int, default=32)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-single", type=int, default=16, help="requests for the one-at-a-time baseline (0: skip)")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--vllm-python", default=None,
                        help="python of a venv with vLLM: runs scripts/vllm_peer.py there on the same workload")
    parser.add_argument("--vllm-engine-args", default="{}",
                        help="JSON of extra vllm.LLM keyword arguments, e.g. '{\"max_num_seqs\": 64}'")
    parser.add_argument("--vllm-timeout", type=float, default=7200.0, help="seconds before the vLLM peer is killed")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file the table is appended to "
                        "('' : print only)")
    parser.add_argument("--json", default=None, help="also write every row (without token ids) to this JSON file")
    args = parser.parse_args(argv)
    json.loads(args.vllm_engine_args)  # refuse bad JSON before an hour of benchmarking
    if args.vllm_python:
        check = [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"]
        try:
            ok = subprocess.run(check, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SystemExit(f"--vllm-python {args.vllm_python}: {e}") from None
        if ok.returncode != 0:
            last = (ok.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"--vllm-python {args.vllm_python} cannot import vllm: {last}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    lens = parse_lens(args.max_model_len)
    if args.model is None:
        from jaxserve.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    from jaxserve.models.loader import read_hf_config, resolve_model_dir

    vocab = int(read_hf_config(resolve_model_dir(args.model))["vocab_size"])
    work = workload(args, vocab)
    need = args.max_prompt + args.max_output
    if any(n is not None and n < need for n in lens):
        raise SystemExit(f"--max-model-len {args.max_model_len}: the workload needs max_model_len >= {need} "
                         f"(--max-prompt {args.max_prompt} + --max-output {args.max_output})")
    results = []
    if args.compare_speculative:
        if not args.speculative_config:
            raise SystemExit("--compare-speculative needs --speculative-config")
        results.append(run_jaxserve(argparse.Namespace(**{**vars(args), "speculative_config": None}), work, lens[0]))
    results += [run_jaxserve(args, work, n) for n in lens]
    model_dir = results[0]["model_dir"]
    if not args.no_hf:
        model, device = load_hf(model_dir, results[0]["dtype"])
        if args.hf_single > 0:
            results.append(run_hf_single(model, device, work[:args.hf_single]))
        results.append(run_hf_static(model, device, work, args.hf_batch_size))
        del model
        gc.collect()
    if args.vllm_python:
        results.append(run_vllm(args, work, model_dir, results[0]["max_model_len"], results[0]["dtype"]))
    text = table(args, results)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    if args.json:
        rows = [{k: v for k, v in r.items() if k != "token_ids"} for r in results]
        Path(args.json).write_text(json.dumps(dict(commit=git_commit(), args=vars(args), rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
