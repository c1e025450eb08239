"""The `jaxserve` command line.

    jaxserve generate [MODEL] --prompt TEXT ...   greedy completion of prompts
                      [--server HOST:PORT]        ... by a running server, over gRPC
    jaxserve serve [MODEL] [--config YAML]        gRPC + OpenAI HTTP server (`jaxserve serve --help`)
    jaxserve demo-model DIR                       write the built-in demo model (random weights)
    jaxserve convert SRC DST                      HF model -> jaxserve Orbax checkpoint
    jaxserve presets                              the engine presets (--config NAME), one line each
    jaxserve bench --server HOST:PORT             serving benchmark (throughput, TTFT, TPOT)

MODEL is a local HF directory, a hub id (downloaded when online) or a converted checkpoint;
without one, the built-in demo model is used (created once in the cache directory).
"""

from __future__ import annotations

import argparse
import logging
import os
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
    if args.server:
        return _generate_remote(args)
    from transformers import AutoTokenizer

    from jaxserve.models.loader import load_model
    from jaxserve.models.single_sequence import SingleSequenceRunner

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


def _generate_remote(args: argparse.Namespace) -> int:
    """`generate --server HOST:PORT`: greedy completion by a running `jaxserve serve`, streamed."""
    import os

    import grpc

    from jaxserve.entrypoints.client import Client
    from jaxserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    with Client(args.server, api_key=os.environ.get("JAXSERVE_API_KEY") or None) as client:
        try:
            for text in args.prompt:
                print(f"--- prompt: {text!r}")
                for delta in client.generate_stream(text, params):
                    print(delta.outputs[0].text, end="", flush=True)
                print()
        except grpc.RpcError as e:
            print(f"error: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`serve`: gRPC and OpenAI-compatible HTTP over one engine until SIGTERM / SIGINT."""
    import os

    from jaxserve.entrypoints.distributed import initialize
    from jaxserve.entrypoints.server import grpc_frontend, http_frontend, serve

    initialize(args.coordinator_address, args.num_processes, args.process_id)
    api_key = args.api_key or os.environ.get("JAXSERVE_API_KEY") or None
    try:
        config = serve_config(args)
        from jaxserve.entrypoints.lora_modules import parse_lora_modules

        lora = parse_lora_modules(args.lora_modules)
        if lora and not config.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        frontends = []
        if args.grpc_port >= 0:
            frontends.append(grpc_frontend(host=args.host, port=args.grpc_port, api_key=api_key,
                                           tls_cert=args.tls_cert, tls_key=args.tls_key,
                                           max_concurrent=args.max_concurrent,
                                           log_requests=not args.disable_log_requests))
        if args.http_port >= 0:
            frontends.append(http_frontend(host=args.host, port=args.http_port, api_key=api_key,
                                           max_concurrent=args.max_concurrent, chat_template=args.chat_template,
                                           tool_parser=args.tool_call_parser,
                                           enable_auto_tool_choice=bool(args.enable_auto_tool_choice),
                                           max_request_body_bytes=args.max_request_body_bytes or None,
                                           request_read_timeout=args.request_read_timeout or None,
                                           generation_config=args.generation_config,
                                           log_requests=not args.disable_log_requests,
                                           **({"served_model_name": args.served_model_name}
                                              if args.served_model_name else {})))
        if not frontends:
            raise ValueError("--grpc-port and --http-port are both disabled (-1); enable at least one")
        if args.enable_auto_tool_choice and not args.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return serve(config, frontends, grace=args.grace_period, model_name=args.served_model_name,
                     **({"lora_modules": lora} if lora else {}))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def cmd_bench(args: argparse.Namespace) -> int:
    """`bench`: a serving benchmark against a running `jaxserve serve` (see jaxserve.entrypoints.bench)."""
    import asyncio
    import json
    import os

    from jaxserve.entrypoints import bench

    try:
        workload = bench.Workload(args.num_requests, bench.parse_range(args.prompt_len),
                                  bench.parse_range(args.output_len), args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import grpc

    try:
        summary = asyncio.run(bench.run(args.server, workload, request_rate=args.request_rate,
                                        max_concurrency=args.max_concurrency, fit=not args.no_fit,
                                        api_key=os.environ.get("JAXSERVE_API_KEY") or None))
    except grpc.RpcError as e:  # GetModelInfo: no server there, or it refused us (per-request errors are counted)
        code = e.code().name if callable(getattr(e, "code", None)) else type(e).__name__
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        print(f"error: cannot query the server at {args.server}: {code}: {details}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(bench.format_table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if summary["completed"] == 0:
        print(f"error: none of the {summary['requests']} requests completed (see the table)", file=sys.stderr)
        return 1
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from jaxserve.demo_model import RANDOM_WEIGHTS_WARNING, DemoModelError, write_demo_model

    try:
        path = write_demo_model(args.dir, seed=args.seed, force=args.force,
                                notify=lambda msg: print(f"note: {msg}", file=sys.stderr))
    except (DemoModelError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, DemoModelError) else 1
    print(f"wrote the demo model to {path}")
    print(f"note: {RANDOM_WEIGHTS_WARNING}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxserve.models.orbax_checkpoint import convert

    dst = convert(args.src, args.dst, dtype=args.dtype)
    print(f"wrote a jaxserve Orbax checkpoint to {dst}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """`presets`: the engine presets, one line each (name, mesh, dtype, buckets, machine)."""
    from jaxserve.preset_catalog import format_presets
    from jaxserve.presets import presets_dir

    print(format_presets())
    print(f"(from {presets_dir()}; use one with --config NAME or LLM(model, config=NAME))")
    return 0


def add_serve_args(srv: argparse.ArgumentParser) -> None:
    """`serve`'s flags in --help groups; every EngineConfig field has one (jaxserve.entrypoints.engine_args)."""
    from jaxserve.entrypoints.engine_args import add_engine_args

    groups = {name: srv.add_argument_group(name, text) for name, text in (
        ("model", "what to serve"), ("engine", "engine settings (EngineConfig fields)"),
        ("parallelism", "devices, mesh and hosts"), ("server", "ports, limits, API behaviour"),
        ("security", "authentication and TLS"))}
    model, parallel, server, security = (groups[k] for k in ("model", "parallelism", "server", "security"))
    model.add_argument("model", nargs="?", help="HF directory, hub id or converted checkpoint (default: demo model)")
    model.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the positional MODEL")
    model.add_argument("--config", help="engine preset: a name (`jaxserve presets` lists them: cpu, tpu-v5e-8, ...) "
                                        "or a YAML file")
    model.add_argument("--served-model-name", help="model name reported to clients")
    model.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                       help="LoRA adapters served by name (the OpenAI `model` field; needs --enable-lora): "
                            "name=path or JSON {\"name\": ..., \"path\": ...}")
    model.add_argument("--chat-template", help="Jinja chat template file overriding the tokenizer's")
    model.add_argument("--generation-config", default="auto",
                       help="default sampling values (temperature, top_p, top_k, min_p, repetition_penalty, "
                            "max_new_tokens) for fields a request leaves unset: 'auto' (default): the model's "
                            "generation_config.json; 'vllm': none; or a directory holding generation_config.json")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    server.add_argument("--http-port", "--port", type=int, default=8000,
                        help="OpenAI-compatible HTTP (vLLM's --port); 0: any free port; -1: off")
    server.add_argument("--grpc-port", type=int, default=50051, help="0: any free port (logged); -1: no gRPC")
    server.add_argument("--tool-call-parser", choices=["hermes", "llama3_json"],
                        help="parse tool calls in chat answers (the demo model's template is hermes style)")
    server.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                        help="tool_choice 'auto' (the default when a request has tools): the model decides, the "
                             "parser finds its calls; needs --tool-call-parser")
    server.add_argument("--max-concurrent", type=int,
                        help="generation calls in flight; beyond: RESOURCE_EXHAUSTED / 429")
    server.add_argument("--max-request-body-bytes", type=int, default=8 * 1024 * 1024,
                        help="HTTP request bodies above this are refused with 413 (default 8 MiB; 0: no limit)")
    server.add_argument("--request-read-timeout", type=float, default=30.0,
                        help="seconds an HTTP request body may take to arrive, then 408 (default 30; 0: none)")
    server.add_argument("--disable-log-requests", action="store_true",
                        help="no access-log line per request (logger jaxserve.access; refusals are still counted "
                             "in jaxserve_requests_rejected_total)")
    server.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight calls get on SIGTERM")
    security.add_argument("--api-key", help="require 'authorization: Bearer KEY' (default: $JAXSERVE_API_KEY)")
    security.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key serves TLS")
    security.add_argument("--tls-key", help="PEM private key")
    parallel.add_argument("--mesh", help="data=D,model=M: data-parallel replicas x tensor-parallel devices "
                                         "(wins over --tensor-parallel-size / --data-parallel-size)")
    parallel.add_argument("--coordinator-address",
                          help="multi-host: process 0's HOST:PORT (or $JAX_COORDINATOR_ADDRESS)")
    parallel.add_argument("--num-processes", type=int, help="multi-host: number of processes (or $JAX_NUM_PROCESSES)")
    parallel.add_argument("--process-id", type=int, help="multi-host: this process (or $JAX_PROCESS_ID)")
    add_engine_args(srv, groups)


def serve_config(args: argparse.Namespace):
    """The EngineConfig of `serve`: flags > the preset (--config) > defaults."""
    from jaxserve.config import EngineConfig
    from jaxserve.entrypoints.engine_args import engine_overrides

    overrides = engine_overrides(args)
    if getattr(args, "model_option", None):
        if args.model and args.model != args.model_option:
            raise ValueError(f"MODEL {args.model!r} and --model {args.model_option!r} differ; give one")
        overrides["model"] = args.model_option
    return EngineConfig.load(args.config, mesh=args.mesh, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference and serving in JAX")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="greedy completion of one or more prompts")
    gen.add_argument("model", nargs="?", help="HF directory, hub id or converted checkpoint (default: demo model)")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--server", metavar="HOST:PORT",
                     help="generate on a running `jaxserve serve` over gRPC (API key from $JAXSERVE_API_KEY)")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve a model over gRPC and HTTP until SIGTERM / SIGINT (which drain)",
                         description="Serve a model over gRPC and the OpenAI HTTP API. Engine settings come from "
                                     "the flags, over the preset (--config), over the defaults.")
    add_serve_args(srv)
    srv.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="serving benchmark against a running `jaxserve serve` (gRPC)")
    bench.add_argument("--server", required=True, metavar="HOST:PORT")
    bench.add_argument("--num-requests", type=int, default=128)
    bench.add_argument("--prompt-len", default="32-512", help="MIN-MAX prompt tokens")
    bench.add_argument("--output-len", default="32-256", help="MIN-MAX output tokens")
    bench.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate (req/s); inf: all at once")
    bench.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-fit", action="store_true",
                       help="send the lengths as given, even where prompt + output exceeds the server's "
                            "max_model_len (such requests are refused and counted); default: clamp to fit")
    bench.add_argument("--json", help="also write the summary to this file")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo-model", help="write the built-in demo model (random weights) to DIR")
    demo.add_argument("dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true",
                      help="if DIR is a non-empty directory that is not a demo model, move it aside to DIR.bak-N "
                           "(never deleted) instead of refusing; a demo model written earlier is always replaced")
    demo.set_defaults(func=cmd_demo_model)

    conv = sub.add_parser("convert", help="convert a HF model to a jaxserve Orbax checkpoint")
    conv.add_argument("src", help="HF directory or hub id")
    conv.add_argument("dst", help="new directory for the checkpoint")
    conv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    conv.set_defaults(func=cmd_convert)

    presets = sub.add_parser("presets", help="list the engine presets (--config NAME): machine, mesh, dtype, buckets")
    presets.set_defaults(func=cmd_presets)
    return parser


# Libraries whose INFO lines are about their own machinery (orbax logs through absl: 15-38 lines per
# checkpoint load or save); shown only with --log-level DEBUG.
QUIET_LOGGERS = ("jax", "absl", "orbax", "orbax.checkpoint", "etils")


def quiet_library_logs(level: str) -> None:
    """At any level above DEBUG, the QUIET_LOGGERS say only warnings and errors, and transformers
    gives no advice: without torch (a plain install has none, and jaxserve never uses it) its
    import warned "PyTorch was not found. Models won't be available" on every command. Runs
    before anything imports transformers."""
    numeric = logging.getLevelName(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else max(logging.WARNING, numeric))
    if numeric > logging.DEBUG:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_logs(args.log_level)
    from jaxserve.models.config import ModelLoadError

    try:
        return args.func(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
