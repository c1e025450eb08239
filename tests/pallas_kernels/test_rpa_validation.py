"""The public wrapper rejects bad shapes and dtypes with the argument's name."""

import jax
import jax.numpy as jnp
import pytest

from jaxserve.kernels import ragged_paged_attention, resolve_backend


def _args(**over):
    s, t = 3, 8
    args = dict(q=jnp.zeros((t, 4, 8)), kv_pages=jnp.zeros((5, 4, 4, 8)),
                kv_lens=jnp.zeros((s,), jnp.int32), block_tables=jnp.zeros((s, 2), jnp.int32),
                cu_q_lens=jnp.zeros((s + 1,), jnp.int32), num_seqs=jnp.zeros((1,), jnp.int32))
    args.update(over)
    return args


def _call(args, **kw):
    kw.setdefault("sm_scale", 0.1)
    return ragged_paged_attention(args["q"], args["kv_pages"], args["kv_lens"],
                                  args["block_tables"], args["cu_q_lens"], args["num_seqs"], **kw)


@pytest.mark.parametrize("over,needle", [
    (dict(q=jnp.zeros((8, 4))), "q must"),
    (dict(q=jnp.zeros((8, 4, 8), jnp.int32)), "q must"),
    (dict(kv_pages=jnp.zeros((5, 4, 3, 8))), "kv_pages"),
    (dict(kv_pages=jnp.zeros((5, 4, 4, 16))), "kv_pages"),
    (dict(q=jnp.zeros((8, 3, 8))), "heads"),
    (dict(kv_lens=jnp.zeros((3,), jnp.float32)), "kv_lens"),
    (dict(kv_lens=jnp.zeros((3, 1), jnp.int32)), "kv_lens"),
    (dict(block_tables=jnp.zeros((2, 2), jnp.int32)), "block_tables"),
    (dict(block_tables=jnp.zeros((3, 2), jnp.uint32)), "block_tables"),
    (dict(cu_q_lens=jnp.zeros((3,), jnp.int32)), "cu_q_lens"),
    (dict(num_seqs=jnp.zeros((), jnp.int32)), "num_seqs"),
    (dict(num_seqs=jnp.zeros((1,), jnp.float32)), "num_seqs"),
])
def test_bad_shapes_and_dtypes_name_the_argument(over, needle):
    with pytest.raises(ValueError, match=needle):
        _call(_args(**over))


@pytest.mark.parametrize("kw,needle", [
    (dict(sliding_window=0), "sliding_window"),
    (dict(soft_cap=-1.0), "soft_cap"),
    (dict(backend="cuda"), "backend"),
    (dict(backend="pallas_tpu", bogus_block=4), "bogus_block"),
    (dict(backend="pallas_tpu", num_q_per_block=0), "num_q_per_block"),
])
def test_bad_options_name_the_option(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _call(_args(), **kw)


def test_validation_happens_at_trace_time_inside_jit():
    args = _args(cu_q_lens=jnp.zeros((7,), jnp.int32))
    with pytest.raises(ValueError, match="cu_q_lens"):
        jax.jit(lambda a: _call(a))(args)


def test_resolve_backend():
    assert resolve_backend("auto") == {"cpu": "xla", "tpu": "jax_tpu"}.get(jax.default_backend(),
                                                                          "pallas_gpu")
    for name in ("reference", "xla", "jax_tpu", "pallas_tpu", "pallas_gpu"):
        assert resolve_backend(name) == name
    assert resolve_backend("tpu") == "jax_tpu" and resolve_backend("gpu") == "pallas_gpu"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("triton")
