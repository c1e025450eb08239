"""The served LoRA adapters by name, shared by the HTTP and gRPC front ends of one engine.

    jaxserve serve --enable-lora --lora-modules sql=/adapters/sql chat=/adapters/chat
    POST /v1/load_lora_adapter   {"lora_name": "sql2", "lora_path": "/adapters/sql2"}
    POST /v1/unload_lora_adapter {"lora_name": "sql2"}

A name maps to one LoRARequest; the server numbers them (lora_int_id 1, 2, ... in order of
loading). The OpenAI `model` field (or GenerateRequest.lora_name) picks an adapter by name; an
unknown name is a 404 / NOT_FOUND naming it. Loading reads and checks the adapter on the engine
thread (a bad one is refused and not listed); unloading is refused while any request of the
adapter is unfinished, so none is ever computed with another adapter's weights.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from jaxserve.lora_request import LoRARequest


class LoRAModules:
    def __init__(self) -> None:
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def resolve(self, name: str | None) -> LoRARequest | None:
        return self.by_name.get(name) if name else None

    async def load(self, engine: Any, name: str, path: str) -> LoRARequest:
        """Registers the adapter with the engine (ValueError: bad adapter, or the name is taken)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("lora_name must be a non-empty string")
        if not isinstance(path, str) or not path:
            raise ValueError("lora_path must be a non-empty string")
        if name in self.by_name:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        lora = LoRARequest(name, next(self._ids), path)
        await engine.add_lora(lora)
        self.by_name[name] = lora
        return lora

    async def unload(self, engine: Any, name: str) -> None:
        """KeyError: unknown name; ValueError: requests of it are unfinished (it stays loaded)."""
        lora = self.by_name.get(name)
        if lora is None:
            raise KeyError(name)
        await engine.remove_lora(lora.lora_int_id)
        del self.by_name[name]

    def cards(self, base: str, created: int) -> list[dict]:
        """/v1/models entries of the adapters (vLLM's: root is the path, parent the base model)."""
        return [{"id": name, "object": "model", "created": created, "owned_by": "jaxserve", "root": lora.lora_path,
                 "parent": base} for name, lora in self.by_name.items()]


def lora_modules(engine: Any) -> LoRAModules:
    """The one registry of an engine (made on first use), so both front ends see the same names."""
    registry = getattr(engine, "_jaxserve_lora_modules", None)
    if registry is None:
        registry = LoRAModules()
        engine._jaxserve_lora_modules = registry
    return registry


def parse_lora_modules(items: list[str] | None) -> dict[str, str]:
    """--lora-modules values, vLLM's forms: `name=path`, or JSON `{"name": ..., "path": ...}`."""
    out: dict[str, str] = {}
    for item in items or ():
        if item.lstrip().startswith("{"):
            try:
                d = json.loads(item)
                name, path = d["name"], d["path"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora-modules: {item!r} is not name=path or {{\"name\": ..., \"path\": ...}}") \
                    from None
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules: {item!r} is not name=path")
        if name in out:
            raise ValueError(f"--lora-modules: the name {name!r} is given twice")
        out[name] = path
    return out


async def preload(engine: Any, modules: dict[str, str]) -> None:
    """Loads --lora-modules before serving (a bad adapter stops the start, naming it)."""
    registry = lora_modules(engine)
    for name, path in modules.items():
        await registry.load(engine, name, path)
