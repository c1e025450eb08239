"""`jaxserve serve` flags for every EngineConfig field, generated from the dataclass.

    add_engine_args(parser, groups)    one flag per field not already a flag (vLLM's name where
                                       vLLM has the setting, else --field-name), typed from the
                                       field's annotation, helped by the field's comment
    engine_overrides(args)             {field: value} for the flags given (the rest stay None,
                                       so the preset's values, then the defaults, hold)

A field added to EngineConfig gets its flag without touching this file; a field with a
hand-written flag (same `dest`) keeps that one. Precedence: flags > preset > defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import typing
from typing import Any, Callable

from jaxserve import config as config_module
from jaxserve.config import ATTENTION_BACKENDS, DTYPES, KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig
from jaxserve.lora_request import LORA_DELTA_METHODS

# EngineConfig field -> its flags, where the name is vLLM's (or vLLM's is an alias).
VLLM_FLAGS: dict[str, tuple[str, ...]] = {
    "page_size": ("--block-size", "--page-size"),
    "memory_fraction": ("--gpu-memory-utilization", "--memory-fraction"),
    "num_pages": ("--num-gpu-blocks-override", "--num-pages"),
    "tensor_parallel_size": ("--tensor-parallel-size", "-tp"),
    "data_parallel_size": ("--data-parallel-size", "-dp"),
    "quantization": ("--quantization", "-q"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": DTYPES, "kv_cache_dtype": KV_CACHE_DTYPES, "attention_backend": tuple(ATTENTION_BACKENDS),
    "lora_delta_method": LORA_DELTA_METHODS,
    "quantization": QUANTIZATIONS,
}
# Help for fields whose source line has no comment.
HELP = {
    "attention_backend": "attention implementation (auto: by platform; see jaxserve.kernels.backend)",
    "enable_prefix_caching": "reuse KV pages of shared prompt prefixes",
    "seed": "engine seed of sampled requests without their own seed",
    "max_logprobs": "the most logprobs / top_logprobs a request may ask for",
}
# Fields by --help group; any other field (new ones included) is an engine setting.
MODEL_FIELDS = ("model", "tokenizer", "dtype", "max_model_len")
PARALLEL_FIELDS = ("tensor_parallel_size", "data_parallel_size", "sharding_rules")


def field_comments() -> dict[str, str]:
    """Each EngineConfig field's comment (same line, or the lines just above), from the source."""
    lines = inspect.getsource(EngineConfig).splitlines()
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = re.match(r"(\w+): [^=]+=[^#]*?(?:#\s*(.*))?$", stripped)
        if m and not stripped.startswith(("def ", "@")):
            text = " ".join(above + ([m.group(2)] if m.group(2) else []))
            comments[m.group(1)] = text.replace("%", "%%")
        above = []
    return comments


def _annotation(field: dataclasses.Field) -> str:
    try:
        hints = typing.get_type_hints(EngineConfig, vars(config_module))
        return str(hints.get(field.name, field.type))
    except Exception:  # noqa: BLE001 - an annotation naming something only a type checker sees
        return str(field.type)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _rules(text: str) -> tuple[tuple[str, str | None], ...]:
    """"embed=,heads=model,vocab=model": logical axis = mesh axis (empty: replicated)."""
    out = []
    for item in _str_list(text):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected AXIS=MESH_AXIS items, got {item!r}")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip() or None))
    return tuple(out)


def _json_or_text(text: str) -> Any:
    """A JSON object / list (vLLM's --speculative-config '{"method": ...}' style), else the text."""
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {e}") from None
    return text


def _converter(annotation: str) -> tuple[Callable[[str], Any] | None, str]:
    """(argparse type, metavar) for an annotation, or (None, "") for a bool switch."""
    a = annotation.replace("typing.", "")
    if re.fullmatch(r"(bool|<class 'bool'>)( \| None)?", a) or a == "Optional[bool]":
        return None, ""
    if "tuple[tuple[str" in a or "Tuple[Tuple[str" in a:
        return _rules, "AXIS=MESH,..."
    if "tuple[int" in a or "Tuple[int" in a:
        return _int_list, "N,N,..."
    if "tuple[str" in a or "Tuple[str" in a:
        return _str_list, "A,B,..."
    if re.search(r"\bint\b", a) and "float" not in a and "str" not in a:
        return int, "N"
    if re.search(r"\bfloat\b", a) and "str" not in a:
        return float, "X"
    if re.fullmatch(r"(str|<class 'str'>)( \| None)?|Optional\[str\]", a):
        return str, ""
    return _json_or_text, "JSON|TEXT"


def flag_names(name: str) -> tuple[str, ...]:
    return VLLM_FLAGS.get(name, ("--" + name.replace("_", "-"),))


def add_engine_args(parser: argparse.ArgumentParser, groups: dict[str, Any]) -> list[str]:
    """Adds a flag for every EngineConfig field whose dest the parser lacks; returns their dests.
    `groups` holds argument groups named "model", "engine" and "parallelism"."""
    taken_dests = {a.dest for a in parser._actions}
    taken_flags = set(parser._option_string_actions)
    comments = field_comments()
    added = []
    for field in dataclasses.fields(EngineConfig):
        if field.name in taken_dests:
            continue
        flags = tuple(f for f in flag_names(field.name) if f not in taken_flags)
        if not flags:
            continue
        group = groups["model" if field.name in MODEL_FIELDS else
                       "parallelism" if field.name in PARALLEL_FIELDS else "engine"]
        default = field.default if field.default is not dataclasses.MISSING else None
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = comments.get(field.name) or HELP.get(field.name)
        help_text = (f"{text} " if text else "") + f"(EngineConfig.{field.name}; default: the preset's, else {shown})"
        convert, metavar = _converter(_annotation(field))
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        if convert is None:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kwargs["type"] = convert
            if field.name in CHOICES:
                kwargs["choices"] = CHOICES[field.name]
            elif metavar:
                kwargs["metavar"] = metavar
            group.add_argument(*flags, **kwargs)
        added.append(field.name)
    return added


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{field: value} for every EngineConfig field given on the command line."""
    values = {}
    for field in dataclasses.fields(EngineConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    return values
