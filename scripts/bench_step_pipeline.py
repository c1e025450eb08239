"""The engine step pipeline: host time per step by phase, the device idle gap, compile counts.

Three measurements on a tiny random Llama (hidden 64, 2 layers, vocab 1024, the locally
trained demo tokenizer; float32, reference attention), written once to --model-dir:

1. Host time per engine step at --num-seqs running decode sequences (default 256; 64-token
   prompts, greedy, ignore_eos). Engine methods are wrapped at runtime with timers (the
   table WRAP below: phase -> "module.Class.method" or "engine:attr.path" on the engine
   instance). Each wrapper measures its EXCLUSIVE time (its wall time minus that of wrapped
   calls nested inside it), which is charged to its phase, so a phase never counts twice:
     schedule    Scheduler.schedule
     input       InputBatch.release / prepare (the step's diffs and inputs) and
                 ModelRunner.dispatch, up to the jitted device launches returning (the
                 launches _body, _sample, _cells, _assign are listed separately in the
                 per-name table, but belong to this phase)
     wait        ModelRunner.collect: blocking on the step's tokens (device time not
                 hidden behind host work)
     update      LLMEngine._apply (unpacking tokens / logprobs) plus Scheduler.update
     detokenize  output processing: OutputProcessor.process
     other       step wall time not inside any wrapped call
   With async_scheduling (the default; --sync turns it off) one step() dispatches step N+1
   before it applies step N, so schedule / input / update / detokenize run while the device
   computes: the phases are host time, not time the device waits.
   Per step mean and p50 (ms) over a steady-state window of --steps steps, which starts
   once all --num-seqs requests are running with their prompts computed (plus a few
   settling steps). A name that does not resolve is skipped and reported.

2. Device idle gap per step = (wall time per step of the steady-state loop) - (device time
   per step), i.e. the host work not hidden behind the device. Device time per step is
   measured by replaying the engine's compiled step (DEVICE_STEP: a chain of jitted
   callables, body then sample) back to back with the arguments captured from one
   steady-state step (host arrays moved to the device first, the donated KV pages and slot
   state threaded from each call's output into the next call, body's hidden states into
   sample) K (--replay) times, blocking only at the end: no host work between launches, so
   that is what the device needs per step. The replay runs on copies of the engine's KV
   pages and slot state, so the engine's state is untouched. The
   window runs in --replay-blocks blocks with one replay run after each (the engine gets
   its state back and goes on), so that both see the same machine load; the device time is
   the median of those runs. The difference is the time per step the device sits waiting
   for the host (host work not overlapped with the device, and the round trip). Also shown:
   wait per step (collect blocking), host work = wall - wait, and the host work hidden
   behind the device = host work - gap = device - wait. The small state programs (_cells,
   _assign, _reset, _copy) are not replayed: in steady decode they rarely run. On CPU the
   "device" is the same cores as the host: host work that overlaps a step slows that step
   down, so there the gap understates what the host costs.

3. (--presets) Compile count and warm-up seconds for configs/gpu-h200-1.yaml and
   configs/tpu-v6e-8.yaml, each loaded with the tiny model, float32, reference attention,
   tensor_parallel_size=1, max_model_len 2048 and a small num_pages (takes minutes on CPU).
   compile_count is the engine's stats()["compile_count"]: in the new engine the sum of the
   cache sizes of all the runner's jits (_body, _sample, _assign, _cells, _reset, _copy).

Prints markdown tables (with os.getloadavg(): CPU timings on a shared machine are noisy);
--write also appends them to BENCHMARKS.md. The persistent XLA compilation cache is off
unless --compilation-cache is given, so warm-up seconds are real compile time.

    python scripts/bench_step_pipeline.py [--num-seqs 256] [--steps 100] [--sync] [--presets] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# ---------------------------------------------------------------------------------------
# What is wrapped: edit these tables when the engine's names change. "module.Class.attr"
# patches the class; "engine:a.b.c" patches attribute c of engine.a.b on the engine that
# the benchmark builds (e.g. a jitted callable kept on the runner instance).
#
# The overlapped engine (async_scheduling): LLMEngine.step() = begin_step() (schedule step
# N+1, runner.batch.release, ModelRunner.dispatch of N+1) then finish_step() (LLMEngine._apply
# of step N: ModelRunner.collect, Scheduler.update, OutputProcessor.process). The old
# engine's table (commit a07298c) was:
#   schedule: Scheduler.schedule; input: LLMEngine._sampling_rows, ModelRunner.dispatch,
#   ModelRunner.prepare, ModelRunner._sampling_md, engine:runner._step; wait:
#   ModelRunner.collect; update: LLMEngine.finish_step, Scheduler.update; detokenize:
#   LLMEngine._output.
WRAP: dict[str, list[str]] = {
    "schedule": ["jaxserve.core.scheduler.Scheduler.schedule"],
    "input": ["jaxserve.worker.input_batch.InputBatch.prepare",
              "jaxserve.worker.input_batch.InputBatch.release",
              "jaxserve.worker.model_runner.ModelRunner.dispatch",
              # the jitted device launches (each returns once dispatched)
              "engine:runner._body", "engine:runner._sample", "engine:runner._cells", "engine:runner._assign"],
    "wait": ["jaxserve.worker.model_runner.ModelRunner.collect"],
    "update": ["jaxserve.engine.llm_engine.LLMEngine._apply",
               "jaxserve.core.scheduler.Scheduler.update"],
    "detokenize": ["jaxserve.engine.output_processor.OutputProcessor.process"],
}
# The engine's compiled step, replayed for the device time: a CHAIN of callables run back to
# back with threaded state. Each call takes its captured arguments (from one window step)
# except the positions in "in", which are filled from the named state slots; the elements
# of its result named in "out" go back into those slots. "state_attrs" says where the engine
# keeps the slots that start the chain (kv, state); a slot without one (hidden) is produced
# inside the chain. The replay runs on copies of the engine's state (the programs donate
# it), so the engine's own state is left as it was and the engine goes on exactly.
# New engine: body (donates kv and state) then sample (donates state), hidden from body's
# output 2 into sample's argument 2. The old engine's equivalent (one program, KV donated):
#   DEVICE_STEP = {"calls": [{"callable": "engine:runner._step", "in": {1: "kv"}, "out": {0: "kv"}}],
#                  "state_attrs": {"kv": "engine:runner.kv_caches"}}
DEVICE_STEP = {
    "calls": [{"callable": "engine:runner._body", "in": {1: "kv", 2: "state"}, "out": {0: "kv", 1: "state", 2: "hidden"}},
              {"callable": "engine:runner._sample", "in": {1: "state", 2: "hidden"}, "out": {0: "state"}}],
    "state_attrs": {"kv": "engine:runner.kv_caches", "state": "engine:runner.state"},
}
# Engine-level names: one step, the warm-up, the scheduler's queues, the compile count.
ENGINE = {
    "step": "engine:step",
    "warm_up": "jaxserve.worker.model_runner.ModelRunner.warm_up",
    "running": "engine:scheduler.running",
    "waiting": "engine:scheduler.waiting",
}
PHASE_ORDER = ["schedule", "input", "wait", "update", "detokenize"]
PRESETS = ["configs/gpu-h200-1.yaml", "configs/tpu-v6e-8.yaml"]
# ---------------------------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)


def write_tiny_model(path: Path) -> Path:
    """The demo model's recipe (demo tokenizer, seeded random weights) at the TINY shape."""
    from safetensors.numpy import save_file

    from jaxserve.demo_model import random_weights, train_tokenizer

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(path)
    vocab = -(-len(tokenizer) // 64) * 64
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
              "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
              "pad_token_id": tokenizer.pad_token_id, "dtype": "float32", "hidden_act": "silu"}
    save_file(random_weights(config, 0), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


# -- resolving and wrapping names ----------------------------------------------------------

def _resolve_class_attr(name: str):
    """'pkg.mod.Class.attr' -> (Class, 'attr'), importing the longest module prefix."""
    parts = name.split(".")
    for i in range(len(parts) - 2, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:-1]:
            obj = getattr(obj, p)
        if not hasattr(obj, parts[-1]):
            raise AttributeError(f"{'.'.join(parts[:-1])} has no attribute {parts[-1]}")
        return obj, parts[-1]
    raise ImportError(f"no module found in {name}")


def _resolve(name: str, engine):
    """-> (owner object, attribute name)."""
    if name.startswith("engine:"):
        obj, *path = name[len("engine:"):].split(".")
        owner = engine
        for p in [obj] + path[:-1] if path else []:
            owner = getattr(owner, p)
        attr = path[-1] if path else obj
        if not hasattr(owner, attr):
            raise AttributeError(f"{type(owner).__name__} has no attribute {attr}")
        return owner, attr
    return _resolve_class_attr(name)


def get_value(name: str, engine, default=None):
    try:
        owner, attr = _resolve(name, engine)
        return getattr(owner, attr)
    except (AttributeError, ImportError):
        return default


class _Forwarding:
    """Wraps a callable kept on an instance (e.g. a jax.jit object) and forwards every other
    attribute (e.g. _cache_size) to it."""

    def __init__(self, fn, wrapper):
        self._fn, self._wrapper = fn, wrapper

    def __call__(self, *a, **k):
        return self._wrapper(*a, **k)

    def __getattr__(self, item):
        return getattr(self._fn, item)


class Timers:
    """Exclusive-time wrappers: each call's wall time minus nested wrapped calls."""

    def __init__(self):
        self.step: dict[str, float] = {}  # name -> exclusive seconds in the current step
        self.calls: dict[str, int] = {}
        self.phase_of: dict[str, str] = {}
        self._stack: list[float] = []  # child time accumulated per open call
        self._undo: list = []
        self.missing: list[str] = []
        self.hooks: dict[str, object] = {}  # name -> fn(args, kwargs, out)

    def _make(self, name: str, fn):
        timers = self

        def timed(*a, **k):
            timers._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                out = fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                child = timers._stack.pop()
                if timers._stack:
                    timers._stack[-1] += dt
                timers.step[name] = timers.step.get(name, 0.0) + dt - child
                timers.calls[name] = timers.calls.get(name, 0) + 1
            hook = timers.hooks.get(name)
            if hook is not None:
                hook(a, k, out)
            return out

        return timed

    def install(self, phase: str, name: str, engine) -> bool:
        try:
            owner, attr = _resolve(name, engine)
        except (AttributeError, ImportError) as e:
            self.missing.append(f"{name} ({e})")
            return False
        self.phase_of[name] = phase
        if isinstance(owner, type):
            raw = inspect.getattr_static(owner, attr)
            if isinstance(raw, staticmethod):
                new = staticmethod(functools.wraps(raw.__func__)(self._make(name, raw.__func__)))
            elif isinstance(raw, classmethod):
                new = classmethod(functools.wraps(raw.__func__)(self._make(name, raw.__func__)))
            else:
                new = functools.wraps(raw)(self._make(name, raw))
            had_own = attr in owner.__dict__
            setattr(owner, attr, new)
            self._undo.append(lambda o=owner, a=attr, r=raw, h=had_own: setattr(o, a, r) if h else delattr(o, a))
        else:
            fn = getattr(owner, attr)
            had_own = attr in getattr(owner, "__dict__", {})
            setattr(owner, attr, _Forwarding(fn, self._make(name, fn)))
            self._undo.append(lambda o=owner, a=attr, f=fn, h=had_own: setattr(o, a, f) if h else delattr(o, a))
        return True

    def uninstall(self):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def take_step(self) -> tuple[dict[str, float], dict[str, int]]:
        out, calls = self.step, self.calls
        self.step, self.calls = {}, {}
        return out, calls


# -- part 1 and 2: steady-state steps, device replay ----------------------------------------

def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def build_engine(model_dir: str, config, **overrides):
    from jaxserve import LLM

    t0 = time.perf_counter()
    llm = LLM(model_dir, config=config, **overrides)
    return llm, time.perf_counter() - t0


def ms(xs) -> tuple[float, float]:
    return 1e3 * statistics.fmean(xs), 1e3 * statistics.median(xs)


def run_pipeline(args, model_dir: str) -> tuple[str, dict]:
    import jax

    from benchmark_throughput import workload
    from jaxserve import SamplingParams

    n, budget = args.num_seqs, 2 * args.num_seqs
    # Requests enter while others decode; each needs its prompt in the spare budget. They
    # must all still be running after the ramp, the settling steps and the window.
    ramp = -(-n * args.prompt_len // (budget - n)) + 16  # bound on the steps to admit them all
    max_tokens = max(args.max_tokens, ramp + args.settle + args.steps + 8)
    max_model_len = 1 << max(9, (args.prompt_len + max_tokens).bit_length())
    page = 16
    num_pages = n * -(-(args.prompt_len + max_tokens + 1) // page) + 16
    engine_cfg = dict(dtype="float32", attention_backend="reference", max_num_seqs=n, max_num_batched_tokens=budget,
                      token_buckets=[n, budget], seq_buckets=[n], page_size=page, num_pages=num_pages,
                      max_model_len=max_model_len, enable_prefix_caching=True, seed=0,
                      compilation_cache_dir=None if args.compilation_cache else "")
    if args.sync:  # only engines that have the option (the old one is always synchronous)
        engine_cfg["async_scheduling"] = False
    la0 = loadavg()
    llm, build_s = build_engine(model_dir, None, **engine_cfg)
    engine = llm.engine
    compiles0 = engine.stats()["compile_count"]

    timers = Timers()
    for phase, names in WRAP.items():
        for name in names:
            timers.install(phase, name, engine)
    captured: dict[str, dict] = {}  # chain callable -> its args / kwargs from one window step
    window_index = [None]  # the window step being run (None: ramp)
    capture_at = [None]  # the window step whose arguments are captured for the replay

    def make_capture(name):
        def capture(a, k, out):  # keeps the args of the first call in the capture step
            if window_index[0] is not None and window_index[0] == capture_at[0] and name not in captured:
                # Host arrays copied now: an engine may reuse its input buffers in place.
                host_copy = functools.partial(jax.tree.map, lambda x: np.array(x) if isinstance(x, np.ndarray) else x)
                captured[name] = dict(args=[host_copy(x) for x in a], kwargs=host_copy(k))
        return capture

    for call in DEVICE_STEP["calls"]:
        timers.hooks[call["callable"]] = make_capture(call["callable"])
        if call["callable"] not in timers.phase_of:
            timers.install("input", call["callable"], engine)
    step_fn = get_value(ENGINE["step"], engine)
    rng_work = workload(argparse.Namespace(seed=0, num_requests=n, min_prompt=args.prompt_len,
                                           max_prompt=args.prompt_len, min_output=max_tokens,
                                           max_output=max_tokens), engine.model_config.vocab_size)
    for i, (prompt, m) in enumerate(rng_work):
        engine.add_request(f"s{i}", prompt, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))

    def steady() -> bool:
        running, waiting = get_value(ENGINE["running"], engine, ()), get_value(ENGINE["waiting"], engine, ())
        return (len(running) == n and not waiting
                and all(r.num_computed_tokens >= len(r.prompt_token_ids) for r in running))

    ramp_steps, settle_left = 0, args.settle
    t_ramp = time.perf_counter()
    while settle_left > 0:
        step_fn()
        timers.take_step()
        ramp_steps += 1
        if steady():
            settle_left -= 1
        if ramp_steps > ramp + args.settle + 50:
            raise RuntimeError(f"never reached {n} running decodes after {ramp_steps} steps")
    ramp_s = time.perf_counter() - t_ramp
    la1 = loadavg()
    per_step, per_calls, walls = [], [], []
    # The window runs in --replay-blocks blocks; after each block the captured step is
    # replayed (interleaved, so that both see the same machine load), then the engine gets
    # its state back and goes on. Without a settable state the replay runs once at the end.
    can_interleave = all(get_value(a, engine) is not None for a in DEVICE_STEP["state_attrs"].values())
    blocks = max(1, min(args.replay_blocks, args.steps)) if can_interleave else 1
    bounds = [round(b * args.steps / blocks) for b in range(blocks + 1)]
    capture_at[0] = bounds[1] // 2  # the middle of the first block
    replayer, replay_runs, replay_error = None, [], None
    window_s = 0.0
    for b in range(blocks):
        t_block = time.perf_counter()
        for i in range(bounds[b], bounds[b + 1]):
            window_index[0] = i
            t0 = time.perf_counter()
            step_fn()
            walls.append(time.perf_counter() - t0)
            s, c = timers.take_step()
            per_step.append(s)
            per_calls.append(c)
        window_s += time.perf_counter() - t_block
        if replay_error is None and (can_interleave or b == blocks - 1):
            try:
                if replayer is None:
                    replayer = Replayer(engine, captured)
                replay_runs += [replayer.run(args.replay) for _ in range(1 if can_interleave else 3)]
            except Exception as e:  # report, do not lose the other parts
                replay_error = f"{type(e).__name__}: {e}"
    still_steady = steady()
    timers.uninstall()
    # The replay's own jit-cache entries (see Replayer) are not the engine's. compile_count
    # sums several jits; Replayer counts the growth of that sum during its runs only.
    compiles_run = engine.stats()["compile_count"] - compiles0 - (replayer.compiles() if replayer else 0)
    if replay_error is not None or not replay_runs:
        replay = dict(error=replay_error or "no replay ran")
    else:
        replay = dict(device_ms=statistics.median(replay_runs), runs_ms=replay_runs, k=args.replay,
                      repeats=len(replay_runs), compiles=replayer.compiles(), interleaved=can_interleave)
    la2 = loadavg()

    rows = []
    wall_mean, wall_p50 = ms(walls)
    phase_steps = {p: [] for p in PHASE_ORDER}
    for s in per_step:
        for p in PHASE_ORDER:
            phase_steps[p].append(sum(v for k, v in s.items() if timers.phase_of.get(k) == p))
    accounted = [sum(s.values()) for s in per_step]
    phase_steps["other"] = [w - a for w, a in zip(walls, accounted)]
    for p in PHASE_ORDER + ["other"]:
        mean, p50 = ms(phase_steps[p])
        rows.append(f"| {p} | {mean:.2f} | {p50:.2f} | {100 * mean / wall_mean:.0f}% |")
    rows.append(f"| **total step (wall)** | **{wall_mean:.2f}** | **{wall_p50:.2f}** | 100% |")
    wait_mean, wait_p50 = ms(phase_steps["wait"])
    host_mean = wall_mean - wait_mean
    mode = getattr(engine.config, "async_scheduling", None)
    mode = "n/a (engine without the option: synchronous)" if mode is None else ("on" if mode else "off")
    detail = []
    for name, phase in timers.phase_of.items():
        xs = [s.get(name, 0.0) for s in per_step]
        calls = statistics.fmean(c.get(name, 0) for c in per_calls)
        mean, p50 = ms(xs)
        detail.append(f"| {phase} | `{name}` | {calls:.1f} | {mean:.3f} | {p50:.3f} |")

    lines = [
        f"#### Step pipeline at {n} running decodes",
        "",
        f"Tiny random Llama (hidden 64, 2 layers, vocab {engine.model_config.vocab_size}), float32, reference "
        f"attention; max_num_seqs {n}, token buckets {list(engine.config.token_buckets)}, seq buckets "
        f"{list(engine.config.seq_buckets)}, max_model_len {max_model_len}, page {page}, {num_pages} pages; "
        f"{n} requests of {args.prompt_len}-token prompts, greedy, ignore_eos, max_tokens {max_tokens}; "
        f"async_scheduling {mode}. "
        f"Window: {args.steps} steps after {ramp_steps} ramp/settle steps ({ramp_s:.1f} s); "
        f"all {n} still running at the end: {still_steady}. Engine built in {build_s:.1f} s "
        f"({compiles0} compilations), {compiles_run} compilations during the run. "
        f"Load average (1/5/15 min): {la0} at start, {la1} at window start, {la2} at end.",
        "",
        "| phase (per step) | mean ms | p50 ms | share of wall (mean) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Host work per step (wall minus wait): {host_mean:.2f} ms. Window wall {window_s:.2f} s = "
        f"{1e3 * window_s / args.steps:.2f} ms/step.",
        "",
        "| phase | wrapped name (exclusive time) | calls/step | mean ms | p50 ms |",
        "|---|---|---|---|---|",
        *detail,
    ]
    if timers.missing:
        lines += ["", "Not wrapped (name missing): " + "; ".join(f"`{m}`" for m in timers.missing)]
    lines += ["", "#### Device idle gap per step", ""]
    if "error" in replay:
        lines.append(f"Device replay failed: {replay['error']}")
    else:
        dev = replay["device_ms"]
        gap_mean, gap_p50 = wall_mean - dev, wall_p50 - dev
        chain = " then ".join(f"`{c['callable']}`" for c in DEVICE_STEP["calls"])
        lines += [
            "| quantity | ms |",
            "|---|---|",
            f"| wall per step, steady loop (mean / p50) | {wall_mean:.2f} / {wall_p50:.2f} |",
            f"| wait per step: blocking on tokens (mean / p50) | {wait_mean:.2f} / {wait_p50:.2f} |",
            f"| host work per step = wall - wait (mean) | {host_mean:.2f} |",
            f"| device per step: {chain} replayed {replay['k']}x back to back "
            f"(median of {replay['repeats']} runs{', interleaved with the window blocks' if replay['interleaved'] else ''}) "
            f"| {dev:.2f} |",
            f"| **idle gap = host work not hidden = wall - device (mean / p50)** | **{gap_mean:.2f} / {gap_p50:.2f}** "
            f"({100 * gap_mean / wall_mean:.0f}% of the step) |",
            f"| host work hidden behind the device = host work - gap = device - wait (mean) | {dev - wait_mean:.2f} |",
            "",
            f"Replay runs (ms per step): {', '.join(f'{x:.2f}' for x in replay['runs_ms'])}; "
            f"new entries in the jits' caches (compile_count, summed over the runner's jits) during the replay "
            f"runs: {replay['compiles']}, excluded from the run's count above (device arrays instead of numpy "
            "ones can take a separate dispatch-cache entry; the warm-up calls keep it out of the timing).",
        ]
    lines.append("")
    result = dict(wall_ms=wall_mean, device_ms=replay.get("device_ms"),
                  phases={p: ms(v) for p, v in phase_steps.items()})
    del llm, engine
    gc.collect()
    return "\n".join(lines), result


class Replayer:
    """Replays the captured step: the DEVICE_STEP chain with the captured arguments moved to
    the device once, the state slots threaded from call to call, no host work between
    launches; blocks only after the last call. Each run starts from copies of the engine's
    state (the chain donates it), so the engine's own state is left untouched."""

    def __init__(self, engine, captured):
        import jax

        self.jax, self.engine = jax, engine

        def to_device(x):
            return jax.device_put(x) if isinstance(x, np.ndarray) else x

        self.calls = []
        for call in DEVICE_STEP["calls"]:
            name = call["callable"]
            if name not in captured:
                raise RuntimeError(f"{name} was not called in the capture step")
            owner, attr = _resolve(name, engine)
            fn = getattr(owner, attr)
            fn = fn._fn if isinstance(fn, _Forwarding) else fn  # the unwrapped callable
            ins = {int(i): slot for i, slot in call["in"].items()}
            outs = {int(i): slot for i, slot in call["out"].items()}
            args = [None if i in ins else jax.tree.map(to_device, x) for i, x in enumerate(captured[name]["args"])]
            kwargs = jax.tree.map(to_device, captured[name]["kwargs"]) if captured[name]["kwargs"] else {}
            self.calls.append((fn, args, kwargs, ins, outs))
        self.warm = 3  # first run: any compile or first-call cost stays out of the timing
        self._compiles = 0

    def _once(self, slots: dict) -> None:
        for fn, args, kwargs, ins, outs in self.calls:
            for i, slot in ins.items():
                args[i] = slots[slot]
            out = fn(*args, **kwargs)
            for i, slot in outs.items():
                slots[slot] = out[i]
            slots["_last"] = out
        for _, args, _, ins, _ in self.calls:  # no references to donated buffers between calls
            for i in ins:
                args[i] = None

    def run(self, k: int) -> float:
        """ms per step over k back-to-back chain runs."""
        jax = self.jax
        import jax.numpy as jnp

        slots = {}
        for slot, name in DEVICE_STEP["state_attrs"].items():
            x = get_value(name, self.engine)
            jax.block_until_ready(x)
            slots[slot] = jax.tree.map(jnp.copy, x)  # the chain donates: replay on a copy
        c0 = self.engine.stats()["compile_count"]
        for _ in range(self.warm):
            self._once(slots)
        self.warm = 1
        jax.block_until_ready(slots)
        t0 = time.perf_counter()
        for _ in range(k):
            self._once(slots)
        jax.block_until_ready(slots)
        dt = (time.perf_counter() - t0) / k
        self._compiles += self.engine.stats()["compile_count"] - c0
        del slots
        return 1e3 * dt

    def compiles(self) -> int:
        """Entries the replay runs added to the engine's jit caches (not the engine's own)."""
        return self._compiles


# -- part 3: compile counts of the presets ------------------------------------------------

def run_presets(args, model_dir: str) -> str:
    lines = ["#### Compile count at warm-up (presets, tiny model on CPU)", "",
             "| preset | token buckets | seq buckets | compile_count after warm-up | warm-up s | engine built s "
             "| load avg before / after |",
             "|---|---|---|---|---|---|---|"]
    for preset in PRESETS:
        timers = Timers()
        timers.install("warm_up", ENGINE["warm_up"], None)
        la0 = loadavg()
        try:
            llm, build_s = build_engine(model_dir, str(ROOT / preset), dtype="float32",
                                        attention_backend="reference", tensor_parallel_size=1,
                                        max_model_len=args.preset_max_model_len, num_pages=args.preset_num_pages,
                                        compilation_cache_dir=None if args.compilation_cache else "")
            warm, _ = timers.take_step()
            cfg = llm.engine.config
            warm_s = f"{warm[ENGINE['warm_up']]:.1f}" if ENGINE["warm_up"] in warm else "n/a"
            lines.append(f"| {preset} | {list(cfg.token_buckets)} | {list(cfg.seq_buckets)} | "
                         f"{llm.stats()['compile_count']} | {warm_s} | {build_s:.1f} | {la0} / {loadavg()} |")
            del llm
        except Exception as e:
            lines.append(f"| {preset} | failed: {type(e).__name__}: {e} | | | | | {la0} |")
        finally:
            timers.uninstall()
            gc.collect()
        print(lines[-1], flush=True)
    if timers.missing:
        lines += ["", "Not wrapped (name missing): " + "; ".join(f"`{m}`" for m in timers.missing)]
    lines += ["", f"Overrides: model = the tiny model, dtype float32, attention_backend reference, "
              f"tensor_parallel_size 1, max_model_len {args.preset_max_model_len}, num_pages "
              f"{args.preset_num_pages}; persistent compilation cache "
              f"{'on' if args.compilation_cache else 'off'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100, help="steady-state window (steps)")
    parser.add_argument("--settle", type=int, default=3, help="steps after all are running, before the window")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=200, help="raised if the window needs more")
    parser.add_argument("--replay", type=int, default=50, help="back-to-back device step calls per replay run")
    parser.add_argument("--replay-blocks", type=int, default=5,
                        help="window blocks, each followed by one replay run")
    parser.add_argument("--sync", action="store_true",
                        help="async_scheduling=False: the same engine with the host/device overlap off")
    parser.add_argument("--presets", action="store_true", help="also compile the GPU/TPU presets (minutes)")
    parser.add_argument("--preset-max-model-len", type=int, default=2048)
    parser.add_argument("--preset-num-pages", type=int, default=64)
    parser.add_argument("--skip-pipeline", action="store_true", help="only the presets")
    parser.add_argument("--compilation-cache", action="store_true", help="use the persistent XLA cache")
    parser.add_argument("--model-dir", default="/tmp/jaxserve-bench-tiny-llama-v1")
    parser.add_argument("--write", action="store_true", help="append the tables to BENCHMARKS.md")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)

    import jax

    from benchmark_throughput import machine

    import jaxserve

    model_dir = str(write_tiny_model(Path(args.model_dir)))
    try:
        rev = os.popen(f"git -C {ROOT} rev-parse --short HEAD 2>/dev/null").read().strip() or "?"
    except OSError:
        rev = "?"
    parts = [f"### Engine step pipeline ({datetime.date.today().isoformat()}, {machine()}, jax {jax.__version__})",
             "", f"Code: `{Path(jaxserve.__file__).parent}` (git {rev}). "
             f"`python scripts/bench_step_pipeline.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    print("\n".join(parts), flush=True)
    if not args.skip_pipeline:
        text, _ = run_pipeline(args, model_dir)
        print(text, flush=True)
        parts.append(text)
    if args.presets:
        text = run_presets(args, model_dir)
        print(text, flush=True)
        parts.append(text)
    if args.write:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
