"""`jaxserve serve`'s flags: one per EngineConfig field (vLLM's names where vLLM has the setting),
generated from the dataclass; flags > preset > defaults; --generation-config's defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json

import httpx
import pytest

from http_helpers import ScriptedEngine, ServerThread, base_url
from jaxserve.config import EngineConfig
from jaxserve.demo_model import train_tokenizer
from jaxserve.entrypoints import engine_args
from jaxserve.entrypoints.cli import add_serve_args, build_parser, serve_config
from jaxserve.entrypoints.openai.generation_config import load_generation_defaults

VLLM_FLAGS = ["--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization", "--kv-cache-dtype",
              "--block-size", "--enable-prefix-caching", "--no-enable-prefix-caching", "--seed", "--port",
              "--max-model-len", "--dtype", "--tensor-parallel-size", "--data-parallel-size", "--tokenizer",
              "--num-gpu-blocks-override", "--max-logprobs", "--generation-config", "--served-model-name",
              "--chat-template", "--tool-call-parser", "--api-key", "--host", "--model"]


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve")
    add_serve_args(parser)
    return parser


def test_every_engine_config_field_has_a_flag():
    parser = serve_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(EngineConfig):
        action = by_dest.get(field.name)
        assert action is not None, f"EngineConfig.{field.name} has no serve flag"
        assert action.option_strings or field.name == "model", field.name
    assert set(VLLM_FLAGS) <= set(parser._option_string_actions)


def test_help_lists_vllm_flags_in_groups(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in VLLM_FLAGS:
        assert flag in text
    headings = [line.rstrip(":") for line in text.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert headings[-5:] == ["model", "engine", "parallelism", "server", "security"]


def test_flags_override_the_preset_which_overrides_defaults():
    args = build_parser().parse_args([
        "serve", "--config", "cpu", "--max-num-seqs", "8", "--block-size", "32", "--no-enable-prefix-caching",
        "--token-buckets", "32,64", "--gpu-memory-utilization", "0.5", "--kv-cache-dtype", "int8", "--seed", "7",
        "--no-async-scheduling", "--sharding-rules", "embed=,heads=model", "--max-logprobs", "5"])
    config = serve_config(args)
    preset = EngineConfig.load("cpu")
    assert (config.max_num_seqs, config.page_size, config.enable_prefix_caching) == (8, 32, False)
    assert config.token_buckets == (32, 64, 128)  # the budget is always the top bucket
    assert (config.memory_fraction, config.kv_cache_dtype, config.seed) == (0.5, "int8", 7)
    assert config.async_scheduling is False and config.max_logprobs == 5
    assert config.sharding_rules == (("embed", None), ("heads", "model"))
    # not given: the preset's values, then the defaults
    assert (config.num_pages, config.dtype, config.max_model_len) == (preset.num_pages, "float32", 512)
    assert config.max_num_batched_tokens == preset.max_num_batched_tokens == 128
    assert config.structured_outputs_compile_timeout_s == EngineConfig().structured_outputs_compile_timeout_s
    # a preset's True is overridden by --no-..., and no flag keeps it
    assert serve_config(build_parser().parse_args(["serve", "--config", "cpu"])).enable_prefix_caching is True
    # --mesh wins over -tp; --model is the positional MODEL
    args = build_parser().parse_args(["serve", "--mesh", "data=2,model=4", "-tp", "2", "--model", "m"])
    config = serve_config(args)
    assert (config.data_parallel_size, config.tensor_parallel_size, config.model) == (2, 4, "m")


def test_bad_flag_values_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--token-buckets", "32,x"])
    assert "--token-buckets" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_num_seqs"):
        serve_config(build_parser().parse_args(["serve", "--max-num-seqs", "0"]))


def test_a_new_field_gets_a_flag_and_a_hand_written_flag_is_kept(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Extended(EngineConfig):
        quantization: str | None = None  # weight quantization method
        speculative_config: dict | None = None  # JSON, as vLLM's
        max_loras: int = 1
        enable_lora: bool = False

    monkeypatch.setattr(engine_args, "EngineConfig", Extended)
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-loras", dest="max_loras", type=int, default=None, help="hand-written")
    add_serve_args(parser)
    args = parser.parse_args(["--quantization", "int8", "--speculative-config", '{"method": "ngram", "k": 3}',
                              "--max-loras", "4", "--enable-lora"])
    assert engine_args.engine_overrides(args) == {
        "quantization": "int8", "speculative_config": {"method": "ngram", "k": 3}, "max_loras": 4,
        "enable_lora": True}
    assert "weight quantization method" in parser._option_string_actions["--quantization"].help
    assert parser._option_string_actions["--max-loras"].help == "hand-written"


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_k": 5, "max_new_tokens": 7, "do_sample": True, "eos_token_id": 2}))
    assert load_generation_defaults(str(tmp_path), None) == {"temperature": 0.6, "top_k": 5, "max_tokens": 7}
    assert load_generation_defaults("auto", str(tmp_path)) == {"temperature": 0.6, "top_k": 5, "max_tokens": 7}
    assert load_generation_defaults("vllm", str(tmp_path)) == {}
    assert load_generation_defaults("auto", str(tmp_path / "none")) == {}
    with pytest.raises(ValueError, match="generation_config"):
        load_generation_defaults(str(tmp_path / "missing"), None)

    class Recording(ScriptedEngine):
        params: list = []

        async def generate(self, prompt, params, request_id):
            self.params.append(params)
            async for out in super().generate(prompt, params, request_id):
                yield out

    engine = Recording(train_tokenizer())
    loop = ServerThread()
    try:
        url = base_url(loop.serve(engine, generation_config=str(tmp_path))) + "/v1/chat/completions"
        msg = [{"role": "user", "content": "hi"}]
        assert httpx.post(url, json={"messages": msg}).status_code == 200
        assert httpx.post(url, json={"messages": msg, "temperature": 0.1, "max_tokens": 3}).status_code == 200
    finally:
        loop.close()
    first, second = engine.params
    assert (first.temperature, first.top_k, first.max_tokens) == (0.6, 5, 7)
    assert (second.temperature, second.top_k, second.max_tokens) == (0.1, 5, 3)
