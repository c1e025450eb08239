"""Mixture-of-experts feed-forward block (Mixtral, Qwen3-MoE, Qwen2-MoE), with expert parallelism.

It replaces the dense MLP of a decoder layer when `cfg.num_experts > 0` (models.decoder builds
it). One step of it, for T flat tokens:

    router      logits [T, E] = x @ router; softmax in float32; top-k experts per token; the k
                probabilities renormalised to sum to 1 (Mixtral always; Qwen when norm_topk_prob)
    sort        the T*k (token, expert) pairs sorted by expert: rows [T*k, D] of x, one
                contiguous group per expert, group sizes int32[E] (a device array: any routing
                runs the same compiled program)
    experts     two grouped matmuls over the sorted rows (`jax.lax.ragged_dot`): gate|up
                [T*k, D] x [E, D, 2F] -> SiLU(gate) * up [T*k, F] x [E, F, D] -> [T*k, D]
    combine     each row scaled by its routing weight, unsorted, summed over its token's k rows
    shared      (Qwen2-MoE) plus a dense shared expert gated by sigmoid(x @ shared_expert_gate)

Every shape is fixed by T, k, E and the widths; only the group sizes change with the routing, and
they are data, so no routing pattern ever compiles a new program. The model never loops over the
experts: it hands the sorted rows and group sizes to one grouped-matmul op. How that op runs is
the platform's: on TPU `jax.lax.ragged_dot` lowers to XLA's grouped matmul; on CPU (and GPU,
unless jax's Pallas Triton lowering is switched on with jax_ragged_dot_use_gpu_pallas_triton_lowering)
jax and XLA expand it into masked dense products over the groups a device holds, so there the
cost still grows with E / ep. tokamax.ragged_dot has no other CPU path (its "xla" implementation
calls jax.lax.ragged_dot_general); its Mosaic and Triton kernels are for TPU and GPU.

Expert parallelism (`cfg.expert_parallel` = ep > 1): the expert weights are split over the
`model` mesh axis on their `expert` logical axis, E / ep whole experts per device, while
attention stays tensor parallel over the same axis. Under tensor parallelism the activations
entering the block are already replicated on every device (the attention output projection
ends in an all-reduce), so no all-to-all is needed to bring tokens to their experts: inside a
shard_map each device routes all T tokens (the router is replicated, so every device computes
the same routing), keeps the rows routed to its own experts (sorted first; the rest fall past
the last group and are zero), runs the two grouped matmuls on them, combines, and one psum over
the model axis adds the devices' partial sums: one all-reduce of [T, D] per layer, the same
collective a tensor-parallel dense MLP ends with. An all-to-all dispatch would move only T*k/ep
rows per device, but needs a capacity bound (dropping tokens, or shapes that change with the
routing); with replicated activations the psum form is exact and fixed-shape. Each device's
grouped matmul runs over a static [T*k, D] row buffer, since in the worst case every token
routes to one device's experts.

Shapes: T tokens, D hidden, E experts (E_l per device), k experts per token, F expert width,
M = T * k routed rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxserve.models.config import ModelConfig
from jaxserve.models.params import param
from jaxserve.models.quantization import dequantize, linear_weight


def route(x: jax.Array, router: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """x [T, D], router [D, E] -> (weights [T, k], experts int32[T, k]) as transformers routes:
    logits in the model dtype, softmax and top-k in float32, the top-k renormalised when
    cfg.norm_topk_prob; Qwen's weights are then cast to the model dtype (Mixtral's stay float32)."""
    logits = jnp.einsum("td,de->te", x, router)  # [T, E]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)  # [T, k], largest first
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if cfg.router_weights_in_model_dtype:
        weights = weights.astype(x.dtype)
    return weights, experts.astype(jnp.int32)


def grouped_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array,
                    down: jax.Array) -> jax.Array:
    """The routed experts' output for the experts held here.

    x [T, D]; weights [T, k]; experts int32[T, k] numbered from this device's first expert
    (ids outside [0, E_l) belong to other devices and contribute nothing); gate_up [E_l, D, 2F]
    (gate columns, then up); down [E_l, F, D]. Returns [T, D] in x.dtype."""
    t, k = experts.shape
    local = gate_up.shape[0]
    flat = experts.reshape(-1)  # [M], pair m is token m // k
    mine = (flat >= 0) & (flat < local)
    key = jnp.where(mine, flat, local)  # other devices' pairs sort past every local group
    order = jnp.argsort(key, stable=True)  # [M]
    group_sizes = jnp.zeros((local,), jnp.int32).at[key].add(1, mode="drop")  # [E_l]
    rows = jnp.take(x, order // k, axis=0)  # [M, D], grouped by expert
    h = jax.lax.ragged_dot(rows, gate_up, group_sizes)  # [M, 2F]
    f = down.shape[1]
    act = (jax.nn.silu(h[:, :f]) * h[:, f:]).astype(x.dtype)  # [M, F]
    y = jax.lax.ragged_dot(act, down, group_sizes)  # [M, D]
    w = jnp.take(weights.reshape(-1), order)  # [M]
    # Scaled in the wider of the two dtypes, as transformers does (Mixtral's weights are float32).
    scaled = y.astype(jnp.promote_types(y.dtype, w.dtype)) * w[:, None]
    contrib = jnp.where(mine[order][:, None], scaled, 0).astype(x.dtype)  # rows past the groups: 0
    position = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))  # inverse
    return jnp.sum(jnp.take(contrib, position, axis=0).reshape(t, k, -1), axis=1)  # [M, D] unsorted -> [T, D]


def dense_reference(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array,
                    down: jax.Array) -> jax.Array:
    """The same as `grouped_experts` computed the slow, obvious way for tests: every expert on
    every token ([E, T, 2F] in full), each token's output the weighted sum of its k experts'."""
    f = down.shape[1]
    h = jnp.einsum("td,edf->etf", x, gate_up)  # [E, T, 2F]
    out = jnp.einsum("etf,efd->etd", jax.nn.silu(h[..., :f]) * h[..., f:], down)  # [E, T, D]
    onehot = jax.nn.one_hot(experts, gate_up.shape[0], dtype=out.dtype)  # [T, k, E]
    return jnp.einsum("tke,tk,etd->td", onehot, weights.astype(out.dtype), out).astype(x.dtype)


class MoEBlock(nnx.Module):
    """Router, E experts (stacked [E, ...] weights) and, when cfg.shared_expert_intermediate_size,
    the shared expert (a dense MLP of that width, made by the caller: models.decoder.make_mlp);
    same call as models.decoder.MLP: x [T, D] -> [T, D]."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, mesh=None, shared_expert: nnx.Module | None = None):
        d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        # The router stays whole on every device (its second axis is deliberately unnamed):
        # every device routes every token, so routing needs no collective.
        self.router = param(rngs, (d, e), ("embed", None), dtype)  # [D, E]
        # cfg.quantization: int8 / e4m3 experts + float32 `*_scale` [E, 1, 2F] / [E, 1, D] (one per
        # expert and output channel); dequantized per layer before the grouped matmuls (ragged_dot
        # takes one dtype), so quantized experts save memory, while their matmuls run in the model dtype.
        self.gate_up_proj, self.gate_up_proj_scale = linear_weight(
            rngs, (e, d, 2 * f), ("expert", "embed", "expert_mlp"), dtype, "gate_up_proj", cfg.quantization)
        self.down_proj, self.down_proj_scale = linear_weight(
            rngs, (e, f, d), ("expert", "expert_mlp", "embed"), dtype, "down_proj", cfg.quantization)
        if (shared_expert is None) != (not cfg.shared_expert_intermediate_size):
            raise ValueError(f"shared_expert_intermediate_size={cfg.shared_expert_intermediate_size} needs a "
                             f"shared expert module exactly when it is > 0, got {shared_expert!r}")
        if shared_expert is not None:
            self.shared_expert = shared_expert
            self.shared_expert_gate = param(rngs, (d, 1), ("embed", None), dtype)  # [D, 1]
        self.cfg = cfg
        if cfg.expert_parallel > 1 and (mesh is None or mesh.shape.get("model") != cfg.expert_parallel):
            raise ValueError(f"expert_parallel={cfg.expert_parallel} needs the ('model',) mesh of that size the "
                             f"experts are split over, got {mesh}")
        self.mesh = mesh if cfg.expert_parallel > 1 else None

    def __call__(self, x: jax.Array, lora_slots: jax.Array | None = None) -> jax.Array:
        """x [T, D] -> [T, D]. lora_slots: unused, experts carry no LoRA slots (models.lora_layers
        adapts a mixture of experts' attention only)."""
        weights, experts = route(x, self.router[...], self.cfg)
        gate_up, down = self.gate_up_proj[...], self.down_proj[...]  # [E, D, 2F], [E, F, D]
        if self.gate_up_proj_scale is not None:
            gate_up = dequantize(gate_up, self.gate_up_proj_scale[...], x.dtype)
            down = dequantize(down, self.down_proj_scale[...], x.dtype)
        if self.mesh is None:
            out = grouped_experts(x, weights, experts, gate_up, down)
        else:
            out = expert_parallel(self.mesh, x, weights, experts, gate_up, down)
        if self.cfg.shared_expert_intermediate_size:
            gate = jax.nn.sigmoid(jnp.einsum("td,do->to", x, self.shared_expert_gate[...]))  # [T, 1]
            out = out + gate * self.shared_expert(x)
        return out


def expert_parallel(mesh, x, weights, experts, gate_up, down) -> jax.Array:
    """grouped_experts with the experts split over the mesh's 'model' axis (see the module
    docstring): x, weights, experts replicated; gate_up, down split on their expert axis."""

    def body(x, weights, experts, gate_up, down):
        first = jax.lax.axis_index("model") * gate_up.shape[0]  # this device's first expert
        return jax.lax.psum(grouped_experts(x, weights, experts - first, gate_up, down), "model")

    split = P("model", None, None)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), split, split), out_specs=P(), check_vma=False)
    return fn(x, weights, experts, gate_up, down)
