"""Meshes and the logical-axis rules that place parameters and KV pages on them.

A MeshConfig names the mesh axes (`data`, `model`) and their sizes, and one rules table
maps the model's logical axes (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, and a
mixture of experts' `expert`, `expert_mlp`) to mesh axes. `data` > 1 means data parallelism: one engine replica per slice of `model`
devices (see jaxserve/data_parallel.py); inside a replica, `model` is tensor parallelism.

Kv heads (as vLLM): the KV cache's kv-head axis is split over the model axis, whole heads per
device. With fewer kv heads than devices each kv head is copied model / kv_heads times
(`Placement.kv_head_replicas`, applied by models.loader), so a device holds one head, the one
its query heads read, never all of them.

Experts (as vLLM's expert parallelism): with `expert: model` (the default) a mixture of experts'
expert weights are split over the model axis, whole experts per device, while attention stays
tensor parallel over the same devices (`Placement.expert_parallel`, models.moe: each device runs
its own experts on the tokens routed to them, and one all-reduce adds the devices' outputs).

Refused at start, with what to change: a mesh whose size is not the device count, a model
axis that does not divide the attention heads, a model axis and kv heads of which neither is a
multiple of the other, rules naming unknown axes, and rules that put two logical axes of one
array on the same mesh axis.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.models.config import ModelConfig, kv_head_replicas

log = logging.getLogger(__name__)

MESH_AXES = ("data", "model")
LOGICAL_AXES = ("embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "expert", "expert_mlp")
# Experts (models.moe): whole experts per device over the model axis (expert parallelism), each
# expert's own width unsplit; a rule table without "expert" keeps every expert on every device.
DEFAULT_RULES = (("embed", None), ("heads", "model"), ("kv_heads", "model"), ("head_dim", None),
                 ("mlp", "model"), ("vocab", "model"), ("expert", "model"), ("expert_mlp", None))
# The logical axes of every array the engine shards (parameters and KV pages), to check
# that no rule set maps two axes of one array onto one mesh axis.
ARRAY_AXES = (("vocab", "embed"), ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim"),
              ("heads", "head_dim", "embed"), ("heads", "head_dim"), ("kv_heads", "head_dim"),
              ("embed", "mlp"), ("mlp", "embed"), ("embed", "vocab"), ("kv_heads", "head_dim"),
              ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed"))


class MeshError(ValueError):
    """A mesh or rules table that cannot work, with what to change."""


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,model=4' -> {'data': 2, 'model': 4}."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise MeshError(f"--mesh must look like data=D,model=M with positive sizes, got {text!r}")
        shape[name] = int(size)
    return shape


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    model: int = 1
    rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES

    def __post_init__(self) -> None:
        for name in ("data", "model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MeshError(f"mesh axis {name!r} must be a positive integer, got {value!r}")
        rules = tuple((str(k), v) for k, v in (self.rules.items() if isinstance(self.rules, Mapping) else self.rules))
        object.__setattr__(self, "rules", rules)
        seen = set()
        for logical, mesh_axis in rules:
            if logical not in LOGICAL_AXES:
                raise MeshError(f"sharding rule for unknown logical axis {logical!r}; known: {', '.join(LOGICAL_AXES)}")
            if logical in seen:
                raise MeshError(f"sharding rules name logical axis {logical!r} twice")
            seen.add(logical)
            if mesh_axis is not None and mesh_axis != "model":
                raise MeshError(f"rule {logical!r} -> {mesh_axis!r}: parameters can only be split over the 'model' "
                                "axis ('data' holds independent replicas); use model or null")
        table = dict(rules)
        for axes in ARRAY_AXES:
            targets = [table.get(a) for a in axes if table.get(a) is not None]
            if len(targets) != len(set(targets)):
                both = [a for a in axes if table.get(a) is not None]
                raise MeshError(f"sharding rules put logical axes {both} of one array on the same mesh axis "
                                f"{targets[0]!r}; map at most one of them to it")

    @property
    def num_devices(self) -> int:
        return self.data * self.model

    @property
    def rule_table(self) -> dict[str, str | None]:
        return dict(self.rules)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, tensor_parallel_size: int | None = None,
                  mesh: str | None = None) -> "MeshConfig":
        """From a preset's `mesh:` section, then the CLI overrides (--mesh wins over -tp)."""
        d = dict(d or {})
        shape = dict(d.get("shape") or {})
        rules = d.get("rules", DEFAULT_RULES)
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise MeshError(f"unknown mesh axes {unknown}; the mesh axes are {', '.join(MESH_AXES)}")
        if tensor_parallel_size:
            shape["model"] = tensor_parallel_size
        if mesh:
            shape.update(parse_mesh(mesh))
        return cls(data=int(shape.get("data", 1)), model=int(shape.get("model", 1)), rules=rules)

    def validate_for(self, cfg: ModelConfig, devices: Sequence[Any] | None = None) -> list[Any]:
        """Checks the mesh against the model and the devices; returns the devices it uses
        (the first data x model; using fewer than are visible is allowed and logged)."""
        devices = list(jax.devices() if devices is None else devices)
        if self.num_devices > len(devices):
            raise MeshError(f"mesh data={self.data} x model={self.model} needs {self.num_devices} devices, "
                            f"but {len(devices)} are visible; pick sizes whose product is at most {len(devices)}")
        if cfg.num_heads % self.model:
            raise MeshError(f"the model axis ({self.model}) must divide num_attention_heads ({cfg.num_heads}); "
                            f"use a model size among {[m for m in range(1, cfg.num_heads + 1) if cfg.num_heads % m == 0]}")
        if self.rule_table.get("kv_heads") == "model":
            try:
                kv_head_replicas(cfg.num_kv_heads, self.model)
            except ValueError as e:
                raise MeshError(str(e)) from None
        if self.rule_table.get("expert") == "model" and cfg.num_experts and cfg.num_experts % self.model:
            raise MeshError(f"expert parallelism over the model axis ({self.model}) needs it to divide num_experts "
                            f"({cfg.num_experts}); use a model size among "
                            f"{[m for m in range(1, cfg.num_heads + 1) if cfg.num_heads % m == 0 and cfg.num_experts % m == 0]}"
                            " or keep the experts whole (rules: expert: null)")
        if self.num_devices < len(devices):
            log.info("mesh data=%d x model=%d uses %d of the %d visible devices", self.data, self.model,
                     self.num_devices, len(devices))
        return devices[: self.num_devices]

    def replica_meshes(self, devices: Sequence[Any] | None = None) -> list[Mesh]:
        """One ('model',) mesh per data replica, each over `model` consecutive devices."""
        devices = list(jax.devices() if devices is None else devices)
        grid = np.asarray(devices, dtype=object).reshape(self.data, self.model)
        return [Mesh(grid[d], ("model",)) for d in range(self.data)]


class Placement:
    """Maps logical axes of arrays to NamedShardings on one replica's ('model',) mesh."""

    def __init__(self, mesh: Mesh, rules: Mapping[str, str | None], cfg: ModelConfig):
        self.mesh = mesh
        self.size = mesh.shape["model"]
        self.rules = dict(rules)
        # Copies of each kv head the model must be loaded with (load_model(kv_head_replicas=)).
        self.kv_head_replicas = (kv_head_replicas(cfg.num_kv_heads, self.size)
                                 if self.rules.get("kv_heads") == "model" else 1)
        self.dims = {"embed": cfg.hidden_size, "heads": cfg.num_heads,
                     "kv_heads": cfg.num_kv_heads * self.kv_head_replicas,
                     "head_dim": cfg.head_dim, "mlp": cfg.intermediate_size, "vocab": cfg.vocab_size,
                     "expert": cfg.num_experts, "expert_mlp": cfg.moe_intermediate_size}
        self.replicated_axes = sorted(a for a, m in self.rules.items()
                                      if m is not None and self.dims[a] % self.size)
        for axis in self.replicated_axes:
            log.warning("logical axis %r (size %d) does not split over the model axis (%d): replicated",
                        axis, self.dims[axis], self.size)
        # Devices the experts are split over (load_model(expert_parallel=)): the model axis when
        # the rules map "expert" to it, else 1 (every expert on every device).
        self.expert_parallel = self.size if cfg.num_experts and self.mesh_axis("expert") == "model" else 1

    def mesh_axis(self, logical: str | None) -> str | None:
        if logical is None or logical in self.replicated_axes:
            return None
        return self.rules.get(logical)

    def spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
        return PartitionSpec(*(self.mesh_axis(a) for a in logical_axes))

    def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def kv_sharding(self) -> NamedSharding:
        """The KV cache [layers, P, page, 2 * cache_kv_heads, head_dim] (models.decoder.init_kv_caches):
        split over the cached kv heads (whole heads per device), never over layers (no rule can
        name "layers")."""
        return self.sharding(("layers", None, None, "kv_heads", None))

    @property
    def kv_heads_sharded(self) -> bool:
        return self.mesh_axis("kv_heads") is not None

    @property
    def kv_heads_per_device(self) -> int:
        """Cached kv heads each device holds (all of them when the rules keep kv heads whole)."""
        heads = self.dims["kv_heads"]
        return heads // self.size if self.kv_heads_sharded else heads
