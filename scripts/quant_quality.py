"""Weight quantization quality: int8 and fp8 weights against the unquantized model, teacher-forced.

One model, one workload: --sequences random prompts of --prompt-len tokens, each continued
greedily by the unquantized float32 model (models.single_sequence) for --output-len tokens
(default 8 x 125 = 1,000 scored positions). Every sequence then goes through the model once per
run (the same paged forward pass, float32 activations) and, over the output positions, each run's
next-token distribution is compared with the baseline's:

  top-1      the argmax agrees with the baseline's
  top-1 >=m  the same over the positions whose baseline top-1 leads its runner-up by >= MARGIN
             nats (not near-ties, which any rounding may flip)
  KL         mean KL(baseline || run) in nats
  max |dlogit| the largest logit difference

Runs: bfloat16 weights and activations (unquantized; the rounding every bf16 deployment already
accepts, for scale), then int8 and fp8 (e4m3) weights with float32 activations, then the same with
w8a8 (activation_quantization: each projection's input quantized per token as well). The random-weight
demo model has nearly flat next-token distributions (weights N(0, 0.02)), so its top-1 figures are
dominated by near-ties; `--model` takes any HF directory (scripts/make_random_model.py, or the engine
test model's sharper random Llama: `--write-peaky DIR`).

    python scripts/quant_quality.py                                    # demo model
    python scripts/quant_quality.py --write-peaky /tmp/peaky --model /tmp/peaky
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.05  # nats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the demo model)")
    p.add_argument("--write-peaky", default=None, metavar="DIR",
                   help="first write the engine test's random Llama (weights N(0, 0.15): peaked distributions) to DIR")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=125)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to append to ('': print only)")
    return p.parse_args(argv)


def log_probs(model_dir: str, seqs: list[list[int]], prompt_len: int, dtype: str, quantization: str | None,
              w8a8: bool = False):
    """Per sequence: log-softmax float64 [output_len, V] of the next-token logits at the output
    positions; and the model's weight bytes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxserve.models.loader import load_model
    from jaxserve.models.quantize_weights import param_bytes
    from jaxserve.models.single_sequence import SingleSequenceRunner

    model = load_model(model_dir, dtype=dtype, quantization=quantization, activation_quantization=w8a8).model
    runner = SingleSequenceRunner(model, max_len=-(-len(seqs[0]) // 16) * 16)
    out = []
    for ids in seqs:
        logits = runner.full_logits(ids)[prompt_len - 1:len(ids) - 1]
        out.append(np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64))
    return out, param_bytes(nnx.state(model, nnx.Param))[0]


def compare(base: list[np.ndarray], run: list[np.ndarray]) -> dict[str, float]:
    b, r = np.concatenate(base), np.concatenate(run)
    top_b, top_r = b.argmax(-1), r.argmax(-1)
    sorted_b = np.sort(b, axis=-1)
    clear = sorted_b[:, -1] - sorted_b[:, -2] >= MARGIN
    kl = np.sum(np.exp(b) * (b - r), axis=-1)
    return {"positions": len(b), "top1": float(np.mean(top_b == top_r)), "clear": int(clear.sum()),
            "top1_clear": float(np.mean((top_b == top_r)[clear])) if clear.any() else float("nan"),
            "kl": float(kl.mean()), "max_dlogit": float(np.abs(b - r).max())}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.write_peaky:
        sys.path.insert(0, str(ROOT / "tests" / "jaxserve"))
        from engine_fixtures import write_engine_test_model

        write_engine_test_model(Path(args.write_peaky))
    from jaxserve.demo_model import ensure_demo_model
    from jaxserve.models.loader import load_model
    from jaxserve.models.single_sequence import SingleSequenceRunner

    model_dir = args.model or str(ensure_demo_model())
    load_before = os.getloadavg()
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    base_model = load_model(model_dir, dtype="float32").model
    vocab = base_model.cfg.vocab_size
    runner = SingleSequenceRunner(base_model, max_len=-(-(args.prompt_len + args.output_len) // 16) * 16)
    seqs = []
    for _ in range(args.sequences):
        prompt = rng.integers(6, min(vocab, 1000), args.prompt_len).tolist()
        seqs.append(prompt + runner.greedy(prompt, args.output_len))
    del runner
    base, base_bytes = log_probs(model_dir, seqs, args.prompt_len, "float32", None)
    b = np.concatenate(base)
    sorted_b = np.sort(b, axis=-1)
    entropy = float(-np.sum(np.exp(b) * b, axis=-1).mean())
    margin = float(np.median(sorted_b[:, -1] - sorted_b[:, -2]))
    rows = []
    for label, dtype, quant, w8a8 in (("bfloat16 weights + activations", "bfloat16", None, False),
                                      ("int8 weights (float32 activations)", "float32", "int8", False),
                                      ("fp8 e4m3 weights (float32 activations)", "float32", "fp8", False),
                                      ("int8 w8a8 (activations int8 per token)", "float32", "int8", True),
                                      ("fp8 w8a8 (activations e4m3 per token)", "float32", "fp8", True)):
        run, nbytes = log_probs(model_dir, seqs, args.prompt_len, dtype, quant, w8a8)
        rows.append((label, nbytes, compare(base, run)))
    load_after = os.getloadavg()
    name = "demo model" if args.model is None else Path(model_dir).name
    lines = [f"Model: {name} ({model_dir}), {args.sequences} sequences x {args.output_len} teacher-forced output "
             f"positions (prompts of {args.prompt_len} random tokens, continued greedily by the float32 model); "
             f"baseline float32, {base_bytes} weight bytes; its mean next-token entropy {entropy:.3f} nats, median "
             f"top-1 lead {margin:.4f} nats. {time.time() - t0:.0f} s on CPU.",
             "",
             f"| run | weight bytes | positions | top-1 agreement | top-1, lead >= {MARGIN} nats (positions) | "
             "mean KL (nats) | max abs logit diff |",
             "|---|---|---|---|---|---|---|"]
    for label, nbytes, c in rows:
        lines.append(f"| {label} | {nbytes} | {c['positions']} | {c['top1']:.4f} | {c['top1_clear']:.4f} "
                     f"({c['clear']}) | {c['kl']:.2e} | {c['max_dlogit']:.4f} |")
    lines += ["", "Load average (1/5/15 min) {:.2f}/{:.2f}/{:.2f} before, {:.2f}/{:.2f}/{:.2f} after.".format(
        *load_before, *load_after), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n<!-- quant_quality.py {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC -->\n"
                    + text + "\n")


if __name__ == "__main__":
    main()
