"""Multi-LoRA on the device: stacked adapter slots beside each projection, and the decoder hook.

Each adapted projection of the (layer-stacked) Attention and MLP modules gets two parameters
with a slot axis, allocated once at engine start (`attach_lora`), zeros until an adapter is
written into a slot (slot 0 stays zeros: no adapter):

    A  [L, S, *in, R]    logical axes ("layers", "lora", *base input axes, "lora_rank")
    B  [L, S, R, *out]   logical axes ("layers", "lora", "lora_rank", *base output axes)

S = max_loras + 1 slots, R = max_lora_rank (smaller ranks are zero-padded: exact zeros in the
delta). A's input axes and B's output axes are the base layer's own, so a tensor-parallel rules
table splits them as it splits the base weight: q/k/v/gate/up's B over heads / kv heads / mlp
(like their outputs), o/down's A over heads / mlp (like their inputs: the low-rank product is
then a partial sum that XLA all-reduces, a [T, S, R] tensor, as it does for the base output).

The hook (`add_lora`, one line after each projection in models.decoder) adds, for a flat batch
x [T, *in] whose tokens each name a slot (lora_slots int32 [T]), the delta of every token's own
adapter, all tokens at once. Three formulations (`LORA_METHODS`, measured in BENCHMARKS.md):

    "onehot"  x against every slot's A ([T, S, R], S small), masked to the token's slot, then
              against every slot's B: two dense einsums, no per-token weight copies (default)
    "gather"  every token's A and B gathered ([T, *in, R], [T, R, *out]), then two einsums
    "ragged"  tokens sorted by slot, `jax.lax.ragged_dot` per group, then unsorted

Shapes: T tokens, S slots, R rank, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.lora_request import LORA_DELTA_METHODS
from jaxserve.models.config import ModelConfig

LORA_METHODS = LORA_DELTA_METHODS  # "onehot" | "gather" | "ragged"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def module_axes(cfg: ModelConfig) -> dict[str, tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]]:
    """module -> ((input axis, size)..., (output axis, size)...) of its base projection, as the
    decoder lays it out (k/v count the cached kv heads, replicas included)."""
    d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.cache_kv_heads, cfg.head_dim, cfg.intermediate_size
    emb, heads, kv = (("embed", d),), (("heads", n), ("head_dim", h)), (("kv_heads", k), ("head_dim", h))
    return {"q_proj": (emb, heads), "k_proj": (emb, kv), "v_proj": (emb, kv), "o_proj": (heads, emb),
            "gate_proj": (emb, (("mlp", f),)), "up_proj": (emb, (("mlp", f),)), "down_proj": ((("mlp", f),), emb)}


def hf_module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """module -> (in, out) of the checkpoint's projection (the model's own kv heads): what a PEFT
    adapter's lora_A / lora_B must match (models.lora.load_lora_adapter)."""
    d, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def supported_modules(cfg: ModelConfig) -> tuple[str, ...]:
    """The projections that can carry an adapter: all seven, attention only for a mixture of
    experts (its experts have no LoRA slots)."""
    return ATTENTION_MODULES if cfg.num_experts else ATTENTION_MODULES + MLP_MODULES


class LoRASlots(nnx.Module):
    """The stacked adapter slots of one module's projections (attribute `<module>_a` / `_b`)."""

    def __init__(self, cfg: ModelConfig, modules: tuple[str, ...], *, num_slots: int, max_rank: int, dtype,
                 method: str = "onehot", sharding_fn=None):
        if method not in LORA_METHODS:
            raise ValueError(f"lora method must be one of {LORA_METHODS}, got {method!r}")
        axes = module_axes(cfg)
        for m in modules:
            ins, outs = axes[m]
            a_axes = ("layers", "lora", *(a for a, _ in ins), "lora_rank")
            b_axes = ("layers", "lora", "lora_rank", *(a for a, _ in outs))
            a_shape = (cfg.num_layers, num_slots, *(s for _, s in ins), max_rank)
            b_shape = (cfg.num_layers, num_slots, max_rank, *(s for _, s in outs))
            setattr(self, f"{m}_a", _zeros_param(a_shape, a_axes, dtype, sharding_fn))
            setattr(self, f"{m}_b", _zeros_param(b_shape, b_axes, dtype, sharding_fn))
        self.modules = tuple(modules)
        self.method = method

    def delta(self, name: str, x: jax.Array, slots: jax.Array) -> jax.Array:
        """x [T, *in], slots int32 [T] -> the per-token delta [T, *out] (float32)."""
        return lora_delta_shaped(x, getattr(self, f"{name}_a")[...], getattr(self, f"{name}_b")[...], slots,
                                 self.method)


def _zeros_param(shape, axes, dtype, sharding_fn) -> nnx.Param:
    sharding = sharding_fn(tuple(axes)) if sharding_fn is not None else None
    value = jnp.zeros(shape, dtype) if sharding is None else jax.jit(
        lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def add_lora(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, slots: jax.Array | None) -> jax.Array:
    """The decoder hook: y (the projection of x) plus each token's adapter delta, or y itself when
    the module has no LoRA slots for `name` or the step has no lora_slots."""
    lora = getattr(module, "lora", None)
    if lora is None or slots is None or name not in lora.modules:
        return y
    return y + lora.delta(name, x, slots).astype(y.dtype)


def _letters(n: int, pool: str) -> str:
    return pool[:n]


def lora_delta_shaped(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array, method: str = "onehot") -> jax.Array:
    """x [T, *in], a [S, *in, R], b [S, R, *out], slots int32 [T] -> [T, *out] float32: each token's
    (x @ A[slot]) @ B[slot], by `method` (module docstring)."""
    i = _letters(x.ndim - 1, "ijk")
    o = _letters(b.ndim - 2, "opq")
    f32 = dict(preferred_element_type=jnp.float32)
    if method == "onehot":
        xa = jnp.einsum(f"t{i},s{i}r->tsr", x, a, **f32)  # [T, S, R]
        hot = (slots[:, None] == jnp.arange(a.shape[0], dtype=slots.dtype)[None, :])  # [T, S]
        xa = jnp.where(hot[:, :, None], xa, 0.0).astype(b.dtype)
        return jnp.einsum(f"tsr,sr{o}->t{o}", xa, b, **f32)
    if method == "gather":
        ga = jnp.take(a, slots, axis=0)  # [T, *in, R]
        gb = jnp.take(b, slots, axis=0)  # [T, R, *out]
        xa = jnp.einsum(f"t{i},t{i}r->tr", x, ga, **f32).astype(b.dtype)  # [T, R]
        return jnp.einsum(f"tr,tr{o}->t{o}", xa, gb, **f32)
    if method == "ragged":
        t, s, r = x.shape[0], a.shape[0], a.shape[-1]
        out_shape = b.shape[2:]
        order = jnp.argsort(slots, stable=True)  # tokens grouped by slot
        sizes = jnp.bincount(slots, length=s).astype(jnp.int32)  # [S]
        xs = jnp.take(x.reshape(t, -1), order, axis=0)  # [T, I]
        xa = jax.lax.ragged_dot(xs, a.reshape(s, -1, r), sizes, **f32).astype(b.dtype)  # [T, R]
        ys = jax.lax.ragged_dot(xa, b.reshape(s, r, -1), sizes, **f32)  # [T, O]
        y = jnp.zeros_like(ys).at[order].set(ys)  # back in token order
        return y.reshape(t, *out_shape)
    raise ValueError(f"lora method must be one of {LORA_METHODS}, got {method!r}")


def attach_lora(model, *, max_loras: int, max_lora_rank: int, method: str = "onehot",
                sharding_fn=None) -> tuple[str, ...]:
    """Gives a loaded CausalLM its LoRA slots (max_loras + 1 per projection, zeros), placed with
    `sharding_fn` (logical axes -> sharding; "lora", "lora_rank" and "layers" are never split).
    Returns the modules that carry slots."""
    cfg = model.cfg
    modules = supported_modules(cfg)
    kw = dict(num_slots=max_loras + 1, max_rank=max_lora_rank, dtype=model.dtype, method=method,
              sharding_fn=sharding_fn)
    model.layers.self_attn.lora = LoRASlots(cfg, ATTENTION_MODULES, **kw)
    if not cfg.num_experts:
        model.layers.mlp.lora = LoRASlots(cfg, MLP_MODULES, **kw)
    return modules


def lora_paths(params) -> list[tuple]:
    """The flat-state paths of every LoRA slot array in a model's nnx state, sorted."""
    return sorted(path for path, _ in nnx.to_flat_state(params) if "lora" in path)


def slot_arrays(cfg: ModelConfig, weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]],
                paths: list[tuple], max_lora_rank: int, dtype) -> dict[tuple, np.ndarray]:
    """One adapter (models.lora.load_lora_adapter's {(layer, module): (A [in, r], B [r, out])}) as the
    contents of one slot of every LoRA array: path -> [L, *in, R] / [L, R, *out] in the decoder's
    layout, zeros for modules and layers the adapter leaves alone; k/v's kv heads copied
    cfg.kv_head_replicas times as the loader copies the base weights."""
    axes = module_axes(cfg)
    out = {}
    for path in paths:
        module, half = path[-1].rsplit("_", 1)
        ins, outs = axes[module]
        if half == "a":
            arr = np.zeros((cfg.num_layers, *(s for _, s in ins), max_lora_rank), np.float32)
        else:
            arr = np.zeros((cfg.num_layers, max_lora_rank, *(s for _, s in outs)), np.float32)
        for layer in range(cfg.num_layers):
            w = weights.get((layer, module))
            if w is None:
                continue
            a, b = w  # [in, r], [r, out]
            r = a.shape[1]
            if half == "a":
                arr[layer, ..., :r] = a.reshape(*(s for _, s in ins), r)
            else:
                rows = b.reshape(r, *(s // (cfg.kv_head_replicas if n == "kv_heads" else 1) for n, s in outs))
                if cfg.kv_head_replicas > 1 and outs[0][0] == "kv_heads":
                    rows = np.repeat(rows, cfg.kv_head_replicas, axis=1)
                arr[layer, :r] = rows
        out[path] = arr.astype(dtype)
    return out
