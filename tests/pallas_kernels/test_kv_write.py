"""write_kv stores every new K/V row in its slot and changes nothing else."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxserve.kernels import write_kv


@pytest.mark.parametrize("page_dtype,new_dtype", [(jnp.float32, jnp.float32),
                                                   (jnp.bfloat16, jnp.float32)])
def test_write_kv_writes_slots_and_nothing_else(page_dtype, new_dtype):
    rng = np.random.default_rng(0)
    num_pages, page_size, hkv, d = 6, 4, 2, 8
    pages = jnp.asarray(rng.standard_normal((num_pages, page_size, 2 * hkv, d)), page_dtype)
    before = np.asarray(pages.astype(jnp.float32))
    real_slots = rng.choice(np.arange(page_size, num_pages * page_size), 7, replace=False)
    slots = np.concatenate([real_slots, [0, 0, 0]]).astype(np.int32)  # 3 padded tokens
    k = jnp.asarray(rng.standard_normal((10, hkv, d)), new_dtype)
    v = jnp.asarray(rng.standard_normal((10, hkv, d)), new_dtype)

    step = jax.jit(write_kv, donate_argnums=0)
    after = np.asarray(step(pages, k, v, jnp.asarray(slots)).astype(jnp.float32))

    flat_after = after.reshape(num_pages * page_size, 2 * hkv, d)
    flat_before = before.reshape(num_pages * page_size, 2 * hkv, d)
    k_cast = np.asarray(k.astype(page_dtype).astype(jnp.float32))
    v_cast = np.asarray(v.astype(page_dtype).astype(jnp.float32))
    for t, slot in enumerate(real_slots):
        np.testing.assert_array_equal(flat_after[slot, 0::2], k_cast[t])
        np.testing.assert_array_equal(flat_after[slot, 1::2], v_cast[t])
    untouched = np.setdiff1d(np.arange(page_size, num_pages * page_size), real_slots)
    np.testing.assert_array_equal(flat_after[untouched], flat_before[untouched])
    # Page 0 takes the padded writes; its other slots stay as they were.
    np.testing.assert_array_equal(flat_after[1:page_size], flat_before[1:page_size])


@pytest.mark.parametrize("bad,needle", [
    (dict(k=jnp.zeros((3, 2, 8)), v=jnp.zeros((3, 2, 8))), "slot_mapping"),
    (dict(v=jnp.zeros((5, 2, 8))), "v must"),
    (dict(k=jnp.zeros((4, 3, 8)), v=jnp.zeros((4, 3, 8))), "kv_pages"),
    (dict(slot_mapping=jnp.zeros((4,), jnp.int64 if jax.config.x64_enabled else jnp.float32)),
     "slot_mapping"),
    (dict(kv_pages=jnp.zeros((4, 4, 8))), "kv_pages"),
])
def test_write_kv_rejects_bad_args(bad, needle):
    args = dict(kv_pages=jnp.zeros((4, 4, 4, 8)), k=jnp.zeros((4, 2, 8)), v=jnp.zeros((4, 2, 8)),
                slot_mapping=jnp.zeros((4,), jnp.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=needle):
        write_kv(args["kv_pages"], args["k"], args["v"], args["slot_mapping"])
