"""Trains a small Llama on local text, so that benchmarks get a model with real margins.

Random-weight models (the demo model, make_random_model.py's) have nearly flat next-token
distributions: free-running greedy comparisons (an 8-bit KV cache against a 16-bit one) part at
the first near-tie. This trains transformers' LlamaForCausalLM (torch, CPU, float32, AdamW, a
fixed seed) with the demo tokenizer on text that is already on the machine (default: the
Python standard library's .py files; nothing is downloaded) and writes a Hugging Face
directory that transformers and jaxserve's `LLM(path)` load:

  config.json, generation_config.json, model.safetensors, the tokenizer files (the demo's,
      chat template included: jaxserve.demo_model's helpers write them)
  training.json   the run: corpus, split, steps, seed, train and held-out loss (nats/token)
  heldout.txt     the held-out files' text, for benchmark prompts the model never trained on
                  (`bench_kv_quant.py --prompts-from DIR/heldout.txt`)

Split: a file is held out when the first byte of sha256(its path relative to its corpus root)
is below 256 / --heldout-every. Documents are packed as <|begin_of_text|> text <|end_of_text|>
into one token stream; each step takes --batch windows of --seq-len tokens at random offsets.

Deterministic given the corpus, the seed and the step count. --steps fixes the count;
otherwise --minutes picks it from the time of the first steps (the learning rate is flat
during the warm-up, so it does not depend on the count until then), and training.json records
it, so `--steps N` repeats a timed run exactly (on the same torch build and thread count). A
timed run on a machine that slows down stops at 1.5 x --minutes (training.json: stopped_early;
its learning rate had not finished its decay, and --steps does not repeat it).

    python scripts/train_tiny_lm.py --out /tmp/tiny-lm                  # about 8 minutes
    python scripts/bench_kv_quant.py --model /tmp/tiny-lm --prompts-from /tmp/tiny-lm/heldout.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")      # the tokenizer's threads (before tokenizers is imported)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

TIMING_STEPS = 4  # steps 1..4 (step 0 warms up) time a step when --minutes picks the count
EXTENSIONS = (".py", ".md", ".txt", ".rst")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--corpus", action="append", default=None,
                   help="a directory (its .py/.md/.txt/.rst files) or a file; repeatable (default: the stdlib)")
    p.add_argument("--max-train-chars", type=int, default=12_000_000, help="train files kept, in split-hash order")
    p.add_argument("--heldout-every", type=int, default=10, help="about 1 file in N is held out")
    p.add_argument("--heldout-chars", type=int, default=2_000_000, help="most held-out text kept (and written)")
    p.add_argument("--minutes", type=float, default=8.0, help="wall time for the training steps")
    p.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of the final loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=768)
    args = p.parse_args(argv)
    if args.warmup <= TIMING_STEPS:
        p.error(f"--warmup must exceed {TIMING_STEPS} (the timed steps run at the warm-up's learning rate)")
    return args


def held_out(rel: str, every: int) -> bool:
    return hashlib.sha256(rel.encode()).digest()[0] < 256 / every


def corpus_files(roots: list[str]) -> list[tuple[str, Path]]:
    """(name relative to its root, path) of every text file under `roots`, sorted by name."""
    out = []
    for root in map(Path, roots):
        if root.is_file():
            out.append((root.name, root))
            continue
        for path in root.rglob("*"):
            rel = path.relative_to(root).as_posix()
            if (path.suffix in EXTENSIONS and path.is_file() and not path.is_symlink()
                    and not any(part in ("site-packages", "dist-packages", "__pycache__") for part in path.parts)):
                out.append((rel, path))
    return sorted(out)


def read_split(args) -> tuple[list[str], list[str], dict]:
    """(train texts, held-out texts, corpus description); each set in sha256 order, cut at its char budget."""
    roots = args.corpus or [sysconfig.get_paths()["stdlib"]]
    sets = {False: [], True: []}
    for rel, path in sorted(corpus_files(roots), key=lambda f: hashlib.sha256(f[0].encode()).hexdigest()):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            sets[held_out(rel, args.heldout_every)].append(text)
    train = _cut(sets[False], args.max_train_chars)
    heldout = _cut(sets[True], args.heldout_chars)
    info = dict(roots=[str(r) for r in roots], train_files=len(train), train_chars=sum(map(len, train)),
                heldout_files=len(heldout), heldout_chars=sum(map(len, heldout)),
                split=f"held out: sha256(path relative to its root)[0] < 256/{args.heldout_every}")
    if not train or not heldout:
        raise SystemExit(f"the corpus {roots} gives {len(train)} train and {len(heldout)} held-out files; need both")
    return train, heldout, info


def _cut(texts: list[str], budget: int) -> list[str]:
    out, total = [], 0
    for t in texts:
        if out and total + len(t) > budget:
            break
        out.append(t[:budget])
        total += len(out[-1])
    return out


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """<|begin_of_text|> text <|end_of_text|> per document, concatenated: int64 [N]."""
    bos, end = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return np.concatenate([np.asarray([bos, *x, end], np.int64) for x in ids])


def lr_at(step: int, total: int, args) -> float:
    """Linear warm-up, then cosine to lr * min_lr_ratio over the steps after it."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(total - args.warmup, 1)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1))))


def heldout_loss(model, stream: np.ndarray, seq_len: int, windows: int) -> float:
    """Mean next-token loss over `windows` evenly spaced held-out windows."""
    import torch

    starts = np.linspace(0, len(stream) - seq_len - 1, windows).astype(np.int64)
    model.eval()
    losses = []
    with torch.no_grad():
        for chunk in np.array_split(starts, max(1, windows // 8)):
            x = torch.from_numpy(np.stack([stream[s:s + seq_len] for s in chunk]))
            losses.append(float(model(input_ids=x, labels=x).loss) * len(chunk))
    model.train()
    return sum(losses) / windows


def build_model(args, config: dict):
    import torch
    import transformers

    torch.manual_seed(args.seed)
    hf = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "dtype")})
    return transformers.LlamaForCausalLM(hf).float()


def train(args, model, train_ids: np.ndarray, heldout_ids: np.ndarray) -> dict:
    """The training loop; returns what training.json records about it."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    total = args.steps if args.steps is not None else args.warmup + 10 ** 9   # fixed after the timed steps
    recent, log = [], []
    start = time.perf_counter()
    step = 0
    stopped_early = False
    while step < total:
        if args.steps is None and time.perf_counter() - start > 1.5 * args.minutes * 60:
            stopped_early = True                                  # a loaded machine: the wall time stays bounded
            print(f"[train] stopping at step {step} of {total}: 1.5 x --minutes has passed", flush=True)
            break
        if args.steps is None and step == TIMING_STEPS + 1:
            per_step = (time.perf_counter() - t_first) / TIMING_STEPS
            total = max(TIMING_STEPS + 1, int(args.minutes * 60 / per_step))   # the evals cost ~1%
            print(f"[train] {per_step:.2f} s a step: {total} steps for {args.minutes:g} minutes", flush=True)
        if step == 1:
            t_first = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args)
        offsets = rng.integers(0, len(train_ids) - args.seq_len, size=args.batch)
        x = torch.from_numpy(np.stack([train_ids[o:o + args.seq_len] for o in offsets]))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-args.eval_every:]
        step += 1
        if step % args.eval_every == 0 or step == total:
            held = heldout_loss(model, heldout_ids, args.seq_len, 16)
            log.append(dict(step=step, train_loss=round(float(np.mean(recent)), 4), heldout_loss=round(held, 4)))
            print(f"[train] step {step}/{total} lr {lr_at(step - 1, total, args):.2e} train {np.mean(recent):.3f} "
                  f"held-out {held:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return dict(steps=step, planned_steps=total, stopped_early=stopped_early,
                tokens_seen=step * args.batch * args.seq_len, train_seconds=round(time.perf_counter() - start, 1),
                train_loss_last=round(float(np.mean(recent)), 4), log=log)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from jaxserve.demo_model import ARCH, llama_config, train_tokenizer, write_hf_files

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"{out} exists and is not an empty directory; choose a new one")
    t0 = time.perf_counter()
    train_texts, heldout_texts, corpus = read_split(args)
    tokenizer = train_tokenizer()
    train_ids, heldout_ids = token_stream(tokenizer, train_texts), token_stream(tokenizer, heldout_texts)
    if min(len(train_ids), len(heldout_ids)) <= args.seq_len + 1:
        raise SystemExit(f"too little text: {len(train_ids)} train and {len(heldout_ids)} held-out tokens for "
                         f"--seq-len {args.seq_len}")
    corpus.update(train_tokens=len(train_ids), heldout_tokens=len(heldout_ids))
    print(f"[train] corpus {corpus} ({time.perf_counter() - t0:.0f} s)", flush=True)
    arch = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                max_position_embeddings=ARCH["max_position_embeddings"])
    config = llama_config(tokenizer, arch)
    model = build_model(args, config)
    run = train(args, model, train_ids, heldout_ids)
    run["heldout_loss"] = round(heldout_loss(model, heldout_ids, args.seq_len, args.eval_windows), 4)
    print(f"[train] final held-out loss {run['heldout_loss']:.3f} nats/token over {args.eval_windows} windows of "
          f"{args.seq_len}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().numpy() for k, v in model.state_dict().items()}
    write_hf_files(out, tokenizer, config, tensors)
    (out / "heldout.txt").write_text("\n\n".join(heldout_texts), encoding="utf-8")
    record = dict(script="scripts/train_tiny_lm.py", args=vars(args), corpus=corpus,
                  params=sum(p.numel() for p in model.parameters()), torch=torch.__version__, **run)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[train] wrote {out} ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
