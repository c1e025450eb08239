"""The `jaxserve` command line.

    jaxserve generate [MODEL] --prompt TEXT ...   greedy completion of prompts
    jaxserve demo-model DIR                       write the built-in demo model (random weights)
    jaxserve convert SRC DST                      HF model -> jaxserve Orbax checkpoint

MODEL is a local HF directory, a hub id (downloaded when online) or a converted checkpoint;
without one, the built-in demo model is used (created once in the cache directory).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

log = logging.getLogger("jaxserve")


def _model_path(model: str | None) -> str:
    if model:
        return model
    from jaxserve.demo_model import ensure_demo_model

    return str(ensure_demo_model())


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from models.loader import load_model
    from models.single_sequence import SingleSequenceRunner

    path = _model_path(args.model)
    log.info("loading model %s (dtype %s)", path, args.dtype)
    loaded = load_model(path, dtype=args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(loaded.model_dir)
    max_len = min(loaded.config.max_position_embeddings, args.max_model_len)
    runner = SingleSequenceRunner(loaded.model, max_len=max_len)
    for text in args.prompt:
        ids = tokenizer(text)["input_ids"]
        if len(ids) + args.max_tokens > max_len:
            raise SystemExit(f"error: prompt of {len(ids)} tokens + max_tokens {args.max_tokens} "
                             f"exceeds max_model_len {max_len}")
        start = time.perf_counter()
        out = runner.greedy(ids, args.max_tokens, stop_ids=set(loaded.config.eos_token_ids))
        elapsed = time.perf_counter() - start
        print(f"--- prompt: {text!r}")
        print(tokenizer.decode(out, skip_special_tokens=True))
        log.info("%d tokens in %.2f s (first call includes compilation)", len(out), elapsed)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from jaxserve.demo_model import RANDOM_WEIGHTS_WARNING, write_demo_model

    path = write_demo_model(args.dir, seed=args.seed)
    print(f"wrote the demo model to {path}")
    print(f"note: {RANDOM_WEIGHTS_WARNING}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from models.orbax_checkpoint import convert

    dst = convert(args.src, args.dst, dtype=args.dtype)
    print(f"wrote a jaxserve Orbax checkpoint to {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference and serving in JAX")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="greedy completion of one or more prompts")
    gen.add_argument("model", nargs="?", help="HF directory, hub id or converted checkpoint (default: demo model)")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo-model", help="write the built-in demo model (random weights) to DIR")
    demo.add_argument("dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_model)

    conv = sub.add_parser("convert", help="convert a HF model to a jaxserve Orbax checkpoint")
    conv.add_argument("src", help="HF directory or hub id")
    conv.add_argument("dst", help="new directory for the checkpoint")
    conv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    from models.config import ModelLoadError

    try:
        return args.func(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
