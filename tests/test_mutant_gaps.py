"""Tests for planted bugs (tests/mutants.md) that no other test caught.

A 16-bit state is widened to float32 for the maths and rounded to its dtype once per call,
to nearest (docs/spec.md 2.7). The state tests elsewhere compare with a tolerance of one
rounding (1e-2), which a truncating or per-token rounding also meets; here the result must
equal, bit for bit, the float32 call from the same widened pool rounded once to bfloat16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gdn_jax import gated_delta_net

P, H, K, V = 6, 2, 16, 16
READ = [4, -1, 1]  # sequence 1 is padding


def _inputs(B: int, T: int, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k = (jax.random.normal(x, (B, T, 1, K)) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = -0.1 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    pool = jax.random.normal(ks[5], (P, H, K, V)).astype(jnp.bfloat16)
    return (q, k, v, g, beta), pool


def test_bf16_pool_is_rounded_once_to_nearest():
    """Three tokens into a bf16 pool on the XLA recurrent path, which updates the pool in place
    through its own float32 -> bfloat16 rounding (integer ops, not a convert): every slot equals
    the float32 call's result rounded once, and the outputs are the float32 call's."""
    args, pool = _inputs(len(READ), 3)

    def step(pool):
        return gated_delta_net(*args, initial_state=pool, output_final_state=True,
                               state_indices=jnp.asarray(READ, jnp.int32),
                               use_qk_l2norm_in_kernel=True, impl="recurrent", backend="xla")

    o16, new16 = jax.jit(step)(pool)
    o32, new32 = jax.jit(step)(pool.astype(jnp.float32))
    assert new16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(o16), np.asarray(o32))
    np.testing.assert_array_equal(np.asarray(new16.astype(jnp.float32)),
                                  np.asarray(new32.astype(jnp.bfloat16).astype(jnp.float32)))
