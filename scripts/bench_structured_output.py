"""Structured outputs: the grammar-engine choice (xgrammar vs llguidance) and the engine's
mask cost per step.

1. Engines (--engines): on the demo tokenizer (byte-level BPE, vocab 1024) and a synthetic
   byte-level tokenizer of --vocab tokens (default 32000: a real model's size), for the 60
   random schemas of tests/jaxserve/random_schemas.py (seed 0) and a table of JSON-schema
   features, each engine compiles the schema (compact JSON: no free whitespace) and runs
   random walks: fill the next-token mask, pick a uniformly random allowed token, accept it,
   until EOS. Reported: compile time, per-token mask time (one row, median and p99), and
   per feature how many of 10 walks produced text that json.loads and jsonschema.validate
   (with the format checker) accept, or the engine's refusal.

2. Engine (--engine-steps): the demo model (random weights), --rows running requests
   decoding --tokens tokens each (ignore_eos, temperature 1), plain vs constrained by the
   regex "[a-z ]*" (a grammar that never ends, so every row needs a mask every step).
   Reported per steady decode step: wall time, host time of the mask fill (64 rows), and the
   device idle gap the mask causes: for each constrained step, how long after the step's
   body finished on the device its sampler was queued (0 when the mask was ready first); a
   watcher thread blocks on each body's output to time its end. A plain step queues its
   sampler right behind its body, so its gap is 0 by construction. On CPU the "device" is
   the same 2 cores as the host and llguidance's threads, so this is a pessimistic bound.

Prints markdown tables with os.getloadavg(); --write appends them to BENCHMARKS.md.

    python scripts/bench_structured_output.py [--engines] [--engine-steps] [--rows 64] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "jaxserve"))  # random_schemas

FEATURES = {
    "$ref / $defs": {"$defs": {"p": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                                     "additionalProperties": False}},
                     "type": "object", "properties": {"x": {"$ref": "#/$defs/p"}}, "required": ["x"],
                     "additionalProperties": False},
    "recursive $ref": {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {
        "$ref": "#/$defs/n"}, "maxItems": 1}}, "required": ["c"], "additionalProperties": False}}, "$ref": "#/$defs/n"},
    "anyOf": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]},
    "oneOf": {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 5}},
                         "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "const": {"type": "object", "properties": {"k": {"const": "fixed"}}, "required": ["k"],
              "additionalProperties": False},
    "type list": {"type": ["string", "null"], "maxLength": 3},
    "format date": {"type": "string", "format": "date"},
    "format email": {"type": "string", "format": "email", "maxLength": 20},
    "format uuid": {"type": "string", "format": "uuid"},
    "format date-time": {"type": "string", "format": "date-time"},
    "propertyNames + min/maxProperties": {"type": "object", "additionalProperties": {
        "type": "integer", "minimum": 0, "maximum": 9}, "minProperties": 1, "maxProperties": 2,
        "propertyNames": {"pattern": "^[a-z]{1,3}$"}},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                     {"type": "boolean"}], "items": False},
    "uniqueItems": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "uniqueItems": True,
                    "maxItems": 3},
    "multipleOf": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 50},
    "exclusive number bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "pattern \\w \\d": {"type": "string", "pattern": "^\\w{1,4}-\\d{1,2}$"},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}},
                          "additionalProperties": False, "maxProperties": 2},
    "not": {"not": {"type": "string"}, "type": ["integer", "boolean"], "minimum": 0, "maximum": 9},
    "if / then": {"type": "object", "properties": {"a": {"type": "boolean"}}, "if": {"properties": {"a": {
        "const": True}}}, "then": {"required": ["a"]}},
    "minLength / maxLength": {"type": "string", "minLength": 2, "maxLength": 4},
    "minItems / maxItems": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    "integer range": {"type": "integer", "minimum": -12, "maximum": 300},
    "number range": {"type": "number", "minimum": -1.5, "maximum": 2.25},
}


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# -- 1. the two grammar engines ----------------------------------------------------------


class _Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab, eos):
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        self.compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab,
                                                                             stop_token_ids=[eos]), max_threads=2)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def walk(self, compiled, rng, eos, limit, times):
        m = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, self.vocab)
        out = []
        for _ in range(limit):
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            times.append(time.perf_counter() - t0)
            token = int(rng.choice(_allowed(mask.numpy()[0], self.vocab)))
            if token == eos:
                return out
            assert m.accept_token(token)
            out.append(token)
        return None


class _Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab, eos):
        import llguidance
        import llguidance.hf
        import llguidance.numpy as llnp

        self.llg, self.llnp, self.vocab = llguidance, llnp, vocab
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={
            "whitespace_flexible": False})
        m = self.llg.LLMatcher(self.tokenizer, grammar)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def walk(self, compiled, rng, eos, limit, times):
        m = compiled.deep_copy()
        mask = self.llnp.allocate_token_bitmask(1, self.vocab)
        out = []
        for _ in range(limit):
            t0 = time.perf_counter()
            self.llnp.fill_next_token_bitmask(m, mask, 0)
            times.append(time.perf_counter() - t0)
            token = int(rng.choice(_allowed(mask[0], self.vocab)))
            if token == eos:
                return out
            assert m.consume_token(token)
            out.append(token)
        return None


def _allowed(row: np.ndarray, vocab: int) -> np.ndarray:
    return np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab])[0]


def _valid(tok, tokens, schema) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(tok.decode(tokens)), schema, format_checker=jsonschema.FormatChecker())
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def synthetic_tokenizer(vocab: int, seed: int = 0):
    """A byte-level tokenizer of `vocab` tokens (a Unigram over the 256 byte symbols and random
    2-8 character pieces of letters, digits and JSON punctuation, 40% with a leading space):
    the size of a real model's vocabulary, which the demo's 1024 is not. No download."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;\"'{}[]()-_"
    pieces = ["<|begin_of_text|>", "<|eot_id|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    seen = set(pieces)
    while len(pieces) < vocab:
        piece = ("\u0120" if rng.random() < 0.4 else "") + "".join(rng.choice(chars) for _ in range(rng.randint(2, 8)))
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    tok = Tokenizer(models.Unigram([(p, -float(len(p))) for p in pieces], unk_id=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def bench_engines(vocab_size: int) -> list[str]:
    from transformers import AutoTokenizer

    from jaxserve.demo_model import ensure_demo_model
    from random_schemas import random_schemas

    if vocab_size == 1024:
        tok = AutoTokenizer.from_pretrained(str(ensure_demo_model()))
    else:
        tok = synthetic_tokenizer(vocab_size)
    vocab, eos = len(tok), tok.convert_tokens_to_ids("<|eot_id|>")
    engines = [_Xgrammar(tok, vocab, eos), _Llguidance(tok, vocab, eos)]
    la0 = loadavg()
    rows = ["| engine | compile ms (median / max) | mask us per token (median / p99) | random schemas: valid / 60 |",
            "|---|---|---|---|"]
    cover: dict[str, dict[str, str]] = {}
    for eng in engines:
        rng = np.random.default_rng(0)
        compile_s, times, valid = [], [], 0
        for schema in random_schemas(60, seed=0):
            t0 = time.perf_counter()
            compiled = eng.compile(schema)
            compile_s.append(time.perf_counter() - t0)
            out = eng.walk(compiled, rng, eos, 400, times)
            valid += out is not None and _valid(tok, out, schema)
        rows.append(f"| {eng.name} | {1e3 * statistics.median(compile_s):.2f} / {1e3 * max(compile_s):.2f} | "
                    f"{1e6 * statistics.median(times):.1f} / {1e6 * float(np.percentile(times, 99)):.1f} | {valid} |")
        for feature, schema in FEATURES.items():
            try:
                compiled = eng.compile(schema)
            except Exception as e:  # noqa: BLE001 - the engine's refusal is the result
                cover.setdefault(feature, {})[eng.name] = "refused: " + str(e).strip().splitlines()[0][:70]
                continue
            rng = np.random.default_rng(1)
            outs = [eng.walk(compiled, rng, eos, 300, []) for _ in range(10)]
            ok = sum(o is not None and _valid(tok, o, schema) for o in outs)
            unfinished = sum(o is None for o in outs)
            cover.setdefault(feature, {})[eng.name] = (f"{ok}/10 valid" + (f", {unfinished} unfinished in 300 tokens"
                                                                             if unfinished else ""))
    rows += ["", f"Load average (1/5/15 min) {la0} before, {loadavg()} after.", "",
             "| JSON-schema feature | xgrammar | llguidance |", "|---|---|---|"]
    rows += [f"| {f} | {r['xgrammar']} | {r['llguidance']} |" for f, r in cover.items()]
    return rows


# -- 2. the mask in the engine -----------------------------------------------------------


class _GapWatcher:
    """Times the end of each constrained step's body (a thread blocks on its output) and
    the moment its sampler is queued; the gap is max(0, sampler queued - body done)."""

    def __init__(self, runner):
        self.runner, self.gaps = runner, []
        self._body, self._sample = runner._body, runner._sample
        self._done: queue.Queue = queue.Queue()
        self._pending: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        runner._body, runner._sample = self._wrap_body, self._wrap_sample
        self.active = False

    def _watch(self):
        while True:
            hidden = self._pending.get()
            if hidden is None:
                return
            hidden.block_until_ready()
            self._done.put(time.perf_counter())

    def _wrap_body(self, *args):
        kv, state, hidden = self._body(*args)
        if self.active:
            self._pending.put(hidden)
        return kv, state, hidden

    def _wrap_sample(self, *args):
        queued = time.perf_counter()
        if self.active:
            self.gaps.append(max(0.0, queued - self._done.get()))
        return self._sample(*args)

    def close(self):
        self._pending.put(None)
        self.runner._body, self.runner._sample = self._body, self._sample


def bench_engine_steps(rows: int, tokens: int) -> list[str]:
    from jaxserve import LLM, SamplingParams

    shapes = dict(max_num_seqs=rows, max_num_batched_tokens=max(256, rows), seq_buckets=(rows,), num_pages=2048,
                  token_buckets=(rows, max(256, rows)))
    llm = LLM(None, config=str(ROOT / "configs" / "cpu.yaml"), **shapes)
    engine = llm.engine
    warm = engine.stats()["compile_count"]
    so = {"regex": "[a-z ]*"}
    out = ["| run | rows | steady decode steps | wall ms / step | mask host ms / step (rows) | "
           "device idle gap ms / step (mean / p50 / max) | compiles after warm-up |",
           "|---|---|---|---|---|---|---|"]
    la0 = loadavg()
    for label, constrained in (("plain", False), ("constrained", True), ("plain", False), ("constrained", True)):
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=True,
                                 structured_outputs=so if constrained else None) for i in range(rows)]
        for i, p in enumerate(params):
            engine.add_request(f"{label}-{time.monotonic_ns()}-{i}", "Write:", p)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or \
                engine.scheduler.waiting:
            engine.step()
        for _ in range(3):  # settle
            engine.step()
        s = engine.structured
        m0, c0 = s.mask_seconds, s.mask_calls
        watcher = _GapWatcher(engine.runner)
        watcher.active = constrained
        steps, t0 = 0, time.perf_counter()
        try:
            while steps < tokens - 10:
                engine.step()
                steps += 1
        finally:
            wall = time.perf_counter() - t0
            watcher.active = False
            watcher.close()
        while engine.has_unfinished_requests():
            engine.step()
        mask_calls = s.mask_calls - c0
        mask_ms = 1e3 * (s.mask_seconds - m0) / mask_calls if mask_calls else 0.0
        gaps = watcher.gaps or [0.0]
        out.append(f"| {label} | {rows} | {steps} | {1e3 * wall / steps:.2f} | "
                   + (f"{mask_ms:.3f} ({rows})" if constrained else "-") + " | "
                   + (f"{1e3 * statistics.mean(gaps):.3f} / {1e3 * statistics.median(gaps):.3f} / "
                      f"{1e3 * max(gaps):.3f}" if constrained else "0 (sampler queued behind the body)")
                   + f" | {engine.stats()['compile_count'] - warm} |")
    out += ["", f"Load average (1/5/15 min) {la0} before, {loadavg()} after."]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", action="store_true")
    ap.add_argument("--engine-steps", action="store_true")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=80)
    ap.add_argument("--vocab", type=int, nargs="+", default=[1024, 32000],
                    help="tokenizer sizes for --engines: 1024 is the demo's, others synthetic")
    ap.add_argument("--write", action="store_true", help="append the tables to BENCHMARKS.md")
    args = ap.parse_args(argv)
    if not (args.engines or args.engine_steps):
        args.engines = args.engine_steps = True
    import jax

    day = datetime.date.today().isoformat()
    lines = [f"### Structured outputs ({day}, {jax.devices()[0].platform} x{len(jax.devices())}, host "
             f"{platform.machine()} ({os.cpu_count()} CPUs))", ""]
    if args.engines:
        for v in args.vocab:
            name = "the demo tokenizer" if v == 1024 else "a synthetic byte-level tokenizer"
            lines += [f"#### Grammar engines on {name} (vocab {v}), random walks", ""] + bench_engines(v) + [""]
    if args.engine_steps:
        lines += [f"#### The mask in the engine: demo model, {args.rows} rows, regex \"[a-z ]*\" vs plain, "
                  "temperature 1, configs/cpu.yaml", ""] + bench_engine_steps(args.rows, args.tokens) + [""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
