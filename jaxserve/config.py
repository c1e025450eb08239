"""EngineConfig: every engine setting in one frozen dataclass, validated on construction.

Sources, later ones win: the dataclass defaults < a YAML preset (a file, or a preset of
`configs/` by name: "cpu", "tpu-v5e-8"; the `engine:` section, or the whole file if it has none) < keyword overrides (`LLM(model, **overrides)`,
CLI flags). Unknown keys are refused with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from jaxserve.kernels.backend import BACKENDS

ATTENTION_BACKENDS = BACKENDS  # see pallas_kernels.backend for what each name runs
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The KV cache also takes 8-bit pages with a scale per token and kv head (pallas_kernels.kv_quant);
# vLLM's "fp8" is e4m3 and is stored as "fp8_e4m3".
KV_CACHE_DTYPES = DTYPES + ("int8", "fp8_e4m3", "fp8")
QUANTIZATIONS = ("int8", "fp8")  # weight quantization (models.quantization); fp8 is e4m3


def _power_of_two_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2lo, 4lo, ... below hi, then hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return tuple(out) + (hi,)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF dir, hub id or Orbax checkpoint; None: the demo model
    tokenizer: str | None = None  # defaults to the model directory
    dtype: str = "auto"  # weights and activations; "auto": the checkpoint's dtype
    kv_cache_dtype: str = "auto"  # "auto": same as dtype; "int8" | "fp8_e4m3" ("fp8"): 8-bit pages + scales
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks + decodes)
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # None: sized from the memory budget
    memory_fraction: float = 0.9  # of device memory left after weights, for KV pages
    kv_cache_memory_bytes: int | None = None  # explicit KV budget (CPU default: 1 GiB)
    token_buckets: tuple[int, ...] | None = None  # None: 16, 32, ... max_num_batched_tokens
    seq_buckets: tuple[int, ...] | None = None  # None: 1, 2, 4, ... max_num_seqs
    attention_backend: str = "auto"
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1  # the mesh's `model` axis: devices one replica spans
    data_parallel_size: int = 1  # the mesh's `data` axis: independent engine replicas
    # Logical axis -> mesh axis ('model' or None); None: jaxserve.sharding.DEFAULT_RULES.
    sharding_rules: tuple[tuple[str, str | None], ...] | None = None
    seed: int = 0
    max_logprobs: int = 20
    # Overlapped loop (vLLM's async scheduling): step N+1 is scheduled and dispatched while
    # step N runs; the device feeds N's tokens to N+1. Outputs are identical either way.
    async_scheduling: bool = True
    # Persistent XLA compilation cache: "auto" = <cache dir>/xla, "" = off. Restarts with the
    # same model and buckets then load the step programs instead of compiling them again.
    compilation_cache_dir: str = "auto"
    # Structured outputs: a grammar (JSON schema, regex, choice, Lark / GBNF) that takes longer
    # than this to compile is refused (a 400 / INVALID_ARGUMENT); compiles run in their own
    # threads, so a slow one never holds up other requests.
    structured_outputs_compile_timeout_s: float = 10.0
    # Multi-LoRA (vLLM's names): PEFT adapters chosen per request (LoRARequest, the OpenAI `model`
    # field), many in one step. Device slots are allocated at start only when enabled.
    enable_lora: bool = False
    max_loras: int = 1  # adapters on the device at once; more wait for a slot (LRU idle eviction)
    max_lora_rank: int = 16  # the largest adapter rank served (every slot is padded to it)
    max_cpu_loras: int | None = None  # adapters kept read in host memory; None: max_loras
    # How each token's low-rank delta is computed (models.lora_layers): onehot | gather | ragged
    lora_delta_method: str = "onehot"
    # Speculative decoding (vLLM's speculative_config: a SpeculativeConfig, a mapping or a JSON
    # string); None: off. See jaxserve/speculative.py.
    speculative_config: Any = None
    # Weight quantization (vLLM's name): None (the checkpoint's weights in `dtype`), "int8" or "fp8"
    # (e4m3): the decoder layers' q/k/v/o/gate/up/down projections stored in 8 bits with a float32
    # scale per output channel, quantized at load (models.quantize_weights).
    quantization: str | None = None
    # w8a8, off by default: with 8-bit weights, also quantize each projection's input per token
    # (dynamic absmax scales) and contract the 8-bit operands (int8 x int8 -> int32 on TPU, e4m3 on GPU).
    activation_quantization: bool = False
    # Prompt logprobs (SamplingParams.prompt_logprobs, completions echo with logprobs): warm-up
    # compiles a prompt-logprob program (LM head over a step's rows) per token bucket; off, it does
    # not and such requests are refused.
    enable_prompt_logprobs: bool = True

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "page_size", "num_pages",
                     "kv_cache_memory_bytes", "tensor_parallel_size", "data_parallel_size"):
            positive(name)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "fp8":
            object.__setattr__(self, "kv_cache_dtype", "fp8_e4m3")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if not isinstance(self.enable_prompt_logprobs, bool):
            raise ValueError(f"enable_prompt_logprobs must be a bool, got {self.enable_prompt_logprobs!r}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {self.num_pages}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence decodes one token")
        if self.sharding_rules is not None:
            from jaxserve.sharding import MeshConfig

            rules = self.sharding_rules
            rules = tuple((str(k), v) for k, v in (rules.items() if isinstance(rules, Mapping) else rules))
            object.__setattr__(self, "sharding_rules", rules)
            MeshConfig(rules=rules)  # refuses bad rules now, with the reason
        timeout = self.structured_outputs_compile_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise ValueError(f"structured_outputs_compile_timeout_s must be in (0, 3600] seconds, got {timeout!r}")
        self._check_lora()
        from jaxserve.speculative import SpeculativeConfig

        object.__setattr__(self, "speculative_config", SpeculativeConfig.coerce(self.speculative_config))
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or null for none), "
                             f"got {self.quantization!r}")
        if not isinstance(self.activation_quantization, bool):
            raise ValueError(f"activation_quantization must be true or false, got {self.activation_quantization!r}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"max_logprobs must be in [0, 20], got {self.max_logprobs}")
        object.__setattr__(self, "token_buckets", self._buckets(
            "token_buckets", self.token_buckets, min(16, self.max_num_batched_tokens), self.max_num_batched_tokens))
        object.__setattr__(self, "seq_buckets", self._buckets(
            "seq_buckets", self.seq_buckets, 1, self.max_num_seqs))

    def _check_lora(self) -> None:
        from jaxserve.lora_request import LORA_DELTA_METHODS

        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"enable_lora must be true or false, got {self.enable_lora!r}")
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1024):
                raise ValueError(f"{name} must be an integer in [1, 1024], got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.lora_delta_method not in LORA_DELTA_METHODS:
            raise ValueError(f"lora_delta_method must be one of {', '.join(LORA_DELTA_METHODS)}, "
                             f"got {self.lora_delta_method!r}")

    @staticmethod
    def _buckets(name: str, given, lo: int, hi: int) -> tuple[int, ...]:
        """Sorted buckets capped at the limit `hi`, which is always the largest bucket."""
        if given is None:
            return _power_of_two_buckets(lo, hi)
        try:
            buckets = sorted({int(b) for b in given})
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a list of positive integers, got {given!r}") from None
        if not buckets or buckets[0] <= 0:
            raise ValueError(f"{name} must be a list of positive integers, got {given!r}")
        return tuple(b for b in buckets if b < hi) + (hi,)

    @property
    def mesh(self):
        """The MeshConfig: data x model devices and the logical-axis rules."""
        from jaxserve.sharding import DEFAULT_RULES, MeshConfig

        return MeshConfig(data=self.data_parallel_size, model=self.tensor_parallel_size,
                          rules=self.sharding_rules or DEFAULT_RULES)

    @classmethod
    def load(cls, config: str | os.PathLike | Mapping[str, Any] | None = None, **overrides: Any) -> "EngineConfig":
        """Defaults < YAML file (or mapping) < keyword overrides. A `mesh=` override
        ("data=2,model=4") sets data_parallel_size and tensor_parallel_size."""
        values: dict[str, Any] = {}
        if config is not None:
            values.update(read_yaml(config) if not isinstance(config, Mapping) else config)
        mesh = overrides.pop("mesh", None)
        values.update({k: v for k, v in overrides.items() if v is not None})  # None: keep the preset's
        if mesh:  # --mesh wins over --tensor-parallel-size
            from jaxserve.sharding import parse_mesh

            shape = parse_mesh(mesh)
            values["data_parallel_size"] = shape.get("data", 1)
            values["tensor_parallel_size"] = shape.get("model", 1)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown engine config keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for key in ("token_buckets", "seq_buckets"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a preset: its `engine:` section (or the whole file when it has none), plus the
    `mesh:` section of mesh presets (shape -> data/tensor parallel sizes, rules). `path` is a
    file or a preset's name ("cpu", "tpu-v5e-8"; see jaxserve.presets)."""
    from jaxserve.presets import resolve_preset

    path = resolve_preset(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    section = data.get("engine", data if "mesh" not in data else {})
    if not isinstance(section, dict):
        raise ValueError(f"the engine section of {path} must be a mapping")
    values = dict(section)
    mesh = data.get("mesh")
    if mesh is not None:
        if not isinstance(mesh, dict):
            raise ValueError(f"the mesh section of {path} must be a mapping")
        unknown = sorted(set(mesh) - {"shape", "rules"})
        if unknown:
            raise ValueError(f"unknown keys in the mesh section of {path}: {', '.join(unknown)}")
        shape = dict(mesh.get("shape") or {})
        bad = sorted(set(shape) - {"data", "model"})
        if bad:
            raise ValueError(f"unknown mesh axes {bad} in {path}; the mesh axes are data, model")
        values.setdefault("data_parallel_size", int(shape.get("data", 1)))
        values.setdefault("tensor_parallel_size", int(shape.get("model", 1)))
        if mesh.get("rules") is not None:
            values.setdefault("sharding_rules", tuple(dict(mesh["rules"]).items()))
    return values
