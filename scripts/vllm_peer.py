"""The vLLM side of scripts/benchmark_throughput.py: runs in vLLM's own venv, never in ours.

benchmark_throughput.py writes the workload (token-id prompts and an output length per
request) to a JSON file and starts this script with the --vllm-python interpreter:

    /work/vllm-venv/bin/python scripts/vllm_peer.py --model DIR --workload W.json --out R.json \\
        --max-model-len 1024 [--dtype float32] [--engine-args '{"max_num_seqs": 64}']

It builds a vllm.LLM on the same model directory, warms it up on a few short requests
(excluded from the time, as jaxserve's warm-up is), then generates every request greedily
with EOS ignored and exactly its output length, and writes R.json: elapsed seconds, output
tokens, the token ids per request (to compare with jaxserve's), the load average before
the engine was built and after the timed run, and vLLM's settings. Imports nothing from
jaxserve, so any venv with vLLM (see BENCHMARKS.md, "How to make the vLLM CPU venv") works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


# vLLM's CPU knobs: which cores its worker binds OpenMP threads to, and how many it keeps
# for the engine-core (scheduler) process (default: 1 on x86).
CPU_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def preload_libs() -> list[str]:
    """The libraries vLLM's CPU guide asks for in LD_PRELOAD: tcmalloc (when the system has
    it) and the Intel OpenMP runtime that vllm-cpu installs into the venv's lib/."""
    found = []
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4"):
        if os.path.exists(pattern):
            found.append(pattern)
            break
    iomp = os.path.join(sys.prefix, "lib", "libiomp5.so")
    if os.path.exists(iomp):
        found.append(iomp)
    return found


def reexec_with_preload() -> None:
    """LD_PRELOAD works only from process start: run this script again with it set (once)."""
    if os.environ.get("JAXSERVE_VLLM_PEER_PRELOAD") is not None:
        return
    libs = [lib for lib in preload_libs() if lib not in os.environ.get("LD_PRELOAD", "")]
    env = dict(os.environ, JAXSERVE_VLLM_PEER_PRELOAD=":".join(libs))
    if libs:
        env["LD_PRELOAD"] = ":".join(libs + [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p])
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def build(args):
    from vllm import LLM

    kwargs = dict(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed)
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # An explicit KV pool, as jaxserve's presets have; vLLM's default (a fraction of the
        # memory node) refuses to start on a machine whose memory others are using.
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_gib << 30
    kwargs.update(json.loads(args.engine_args))
    return LLM(**kwargs)


def generate(llm, prompts: list[list[int]], max_tokens: list[int]):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True) for n in max_tokens]
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def settings(llm) -> dict:
    """vLLM's scheduler limits as it resolved them (attribute names vary across versions)."""
    out = {}
    try:
        sched = llm.llm_engine.vllm_config.scheduler_config
        out["max_num_seqs"] = sched.max_num_seqs
        out["max_num_batched_tokens"] = sched.max_num_batched_tokens
    except AttributeError:
        pass
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--workload", required=True, help='JSON: {"prompts": [[ids]], "max_tokens": [n]}')
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-args", default="{}", help="JSON of extra vllm.LLM keyword arguments")
    parser.add_argument("--warmup-requests", type=int, default=4)
    parser.add_argument("--kv-cache-gib", type=int, default=2,
                        help="KV pool (GiB) unless VLLM_CPU_KVCACHE_SPACE or --engine-args set one")
    args = parser.parse_args(argv)
    reexec_with_preload()
    work = json.loads(open(args.workload).read())
    prompts, max_tokens = work["prompts"], work["max_tokens"]
    if len(prompts) != len(max_tokens):
        raise SystemExit(f"workload has {len(prompts)} prompts but {len(max_tokens)} output lengths")

    import torch
    import vllm

    load_before = load_avg()
    t0 = time.perf_counter()
    llm = build(args)
    k = min(args.warmup_requests, len(prompts))
    generate(llm, [p[:16] for p in prompts[:k]], [4] * k)
    startup = time.perf_counter() - t0
    start = time.perf_counter()
    outs = generate(llm, prompts, max_tokens)
    elapsed = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    result = dict(elapsed=elapsed, requests=len(prompts), tokens=sum(len(t) for t in token_ids), token_ids=token_ids,
                  startup=startup, load_before=load_before, load_after=load_avg(), vllm_version=vllm.__version__,
                  torch_version=torch.__version__, preload=os.environ.get("LD_PRELOAD", ""),
                  cpu_env={k: os.environ.get(k, "unset") for k in CPU_ENV}, **settings(llm))
    with open(args.out, "w") as f:
        json.dump(result, f)
    short = [i for i, (t, n) in enumerate(zip(token_ids, max_tokens)) if len(t) != n]
    if short:
        print(f"warning: {len(short)} requests did not produce their exact output length (first: {short[0]})",
              file=sys.stderr)
    print(f"vllm {vllm.__version__}: {result['tokens']} output tokens in {elapsed:.2f} s "
          f"({result['tokens'] / elapsed:.1f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
