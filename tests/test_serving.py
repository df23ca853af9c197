"""Serving options of the pool: separate read and write slots (`output_state_indices`) and
`has_initial_state`, on every path: writes land where asked and nowhere else (every other slot
bit-identical, the read slots included), outputs and gradients equal per-sequence calls."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import gated_delta_net
from helpers import assert_pallas, rel_err, slow_except

P, H, K, V = 7, 2, 16, 16
READ = [1, -1, 4, 3]      # sequence 1 is padding
WRITE = [2, 5, 0, -1]     # sequence 3 writes nothing; slot 5 (padding's) must stay untouched
HAS = [True, True, False, True]  # sequence 2 starts from zeros: its slot 4 is not used

PATHS = [("reference", "xla"), ("recurrent", "xla"), ("chunked", "xla"),
         ("recurrent", "pallas"), ("chunked", "pallas")]


def _inputs(T, seed=0):
    N = len(READ)
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k = (jax.random.normal(x, (N, T, H, K)) for x in ks[:2])
    v = jax.random.normal(ks[2], (N, T, H, V))
    g = -0.1 * jax.nn.softplus(jax.random.normal(ks[3], (N, T, H)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (N, T, H)))
    pool = jax.random.normal(ks[5], (P, H, K, V))
    pool = pool.at[4].set(jnp.nan)  # a slot that must not be read (has_initial_state False)
    return q, k, v, g, beta, pool


def _op(impl, backend, read, write, has):
    def f(q, k, v, g, beta, pool):
        return gated_delta_net(q, k, v, g, beta, initial_state=pool, state_indices=read,
                               output_state_indices=write, has_initial_state=has,
                               output_final_state=True, use_qk_l2norm_in_kernel=True,
                               impl=impl, backend=backend, interpret=backend == "pallas")
    return f


def _expected(q, k, v, g, beta, pool):
    """Per-sequence reference calls from the slots read (zeros where has is False)."""
    h0 = jnp.stack([pool[r] if (r >= 0 and h) else jnp.zeros_like(pool[0])
                    for r, h in zip(READ, HAS)])
    o, ht = gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                            use_qk_l2norm_in_kernel=True, impl="reference")
    o = o.at[1].set(0.0)  # padding
    want = pool
    for n, (r, w) in enumerate(zip(READ, WRITE)):
        if r >= 0 and w >= 0:
            want = want.at[w].set(ht[n])
    return o, want


# Everyday tier: the token paths at T = 3: reference (the pool gathered and scattered in the
# op: tests/mutants.md has-initial-state, write-slot, pool-padding), the XLA recurrent path's
# in-place pool and the Pallas recurrent kernel (its write-slot table and has flags read in
# the kernel). The chunked paths (T = 70, the gathered pool as on the reference path): full
# suite only.
@pytest.mark.parametrize("impl,backend", slow_except(PATHS, 0, 1, 3),
                         ids=[f"{i}-{b}" for i, b in PATHS])
def test_write_slots_and_has_initial_state(impl, backend):
    T = 70 if impl == "chunked" else 3
    args = _inputs(T)
    idx = [jnp.asarray(x, d) for x, d in ((READ, jnp.int32), (WRITE, jnp.int32), (HAS, bool))]
    fn = _op(impl, backend, *idx)
    if backend == "pallas":
        assert_pallas(fn, *args)
    o, pool = jax.jit(fn)(*args)
    o_want, pool_want = _expected(*args)
    written = {w for r, w in zip(READ, WRITE) if r >= 0 and w >= 0}
    for slot in range(P):
        if slot in written:
            assert rel_err(pool[slot], pool_want[slot]) <= 1e-4, slot
        else:  # bit-identical, the read slots (and the NaN one) included
            np.testing.assert_array_equal(np.asarray(pool[slot]), np.asarray(args[5][slot]))
    assert rel_err(o, o_want) <= 1e-4
    assert not np.any(np.asarray(o[1]))


# Everyday tier: recurrent-pallas, the Pallas recurrent forward with its backward on the
# Pallas chunked kernels (T = 3, one ragged chunk): the pool's gradient through the gather of
# the read slots and the scatter into the write slots, with has_initial_state False and a
# padding entry, against autodiff of the reference. The chunked cases: full suite only.
@pytest.mark.parametrize("impl,backend", slow_except([("chunked", "pallas"), ("chunked", "xla"),
                                                      ("recurrent", "pallas")], 2), ids=str)
def test_gradients_with_write_slots_match_autodiff_of_the_reference(impl, backend):
    T = 70 if impl == "chunked" else 3
    q, k, v, g, beta, pool = _inputs(T, seed=1)
    pool = pool.at[4].set(0.5)  # finite here: gradients flow through the pool
    idx = [jnp.asarray(x, d) for x, d in ((READ, jnp.int32), (WRITE, jnp.int32), (HAS, bool))]
    w = jax.random.normal(jax.random.key(9), (P, H, K, V))

    def loss(fn):
        def f(*a):
            o, new = fn(*a)
            return jnp.sum(jnp.sin(o)) + jnp.sum(w * new)
        return f

    got = jax.grad(loss(_op(impl, backend, *idx)), argnums=tuple(range(6)))(q, k, v, g, beta, pool)
    want = jax.grad(loss(_op("reference", "xla", *idx)), argnums=tuple(range(6)))(
        q, k, v, g, beta, pool)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dpool"), got, want):
        assert rel_err(a, b) <= 1e-4, name


def test_has_initial_state_without_a_pool_starts_from_zeros():
    q, k, v, g, beta, pool = _inputs(5)
    h0 = pool[:4].at[2].set(1.0)
    has = jnp.asarray([True, False, True, False])
    o, ht = gated_delta_net(q, k, v, g, beta, initial_state=h0, has_initial_state=has,
                            output_final_state=True)
    o2, ht2 = gated_delta_net(q, k, v, g, beta, initial_state=jnp.where(
        has[:, None, None, None], h0, 0.0), output_final_state=True)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o2))
    np.testing.assert_array_equal(np.asarray(ht), np.asarray(ht2))


@pytest.mark.parametrize("kw,err,match", [
    (dict(output_state_indices=jnp.zeros((4,), jnp.int32)), ValueError, "needs state_indices"),
    (dict(state_indices=jnp.arange(4, dtype=jnp.int32),
          output_state_indices=jnp.zeros((4,), jnp.float32)), TypeError, "int32"),
    (dict(state_indices=jnp.arange(4, dtype=jnp.int32),
          output_state_indices=jnp.asarray([0, 1, 1, 2], jnp.int32)), ValueError, "repeat"),
    (dict(state_indices=jnp.arange(4, dtype=jnp.int32),
          output_state_indices=jnp.asarray([0, 1, 2, 9], jnp.int32)), ValueError, r"\[-1, P\)"),
    (dict(has_initial_state=jnp.ones((4,), jnp.int32)), TypeError, "bool"),
    (dict(has_initial_state=jnp.ones((3,), bool)), ValueError, r"\[N\]=\[4\]"),
], ids=["out-without-pool", "out-dtype", "out-repeat", "out-range", "has-dtype", "has-shape"])
def test_serving_argument_errors_name_the_argument(kw, err, match):
    q, k, v, g, beta, pool = _inputs(2)
    with pytest.raises(err, match=match):
        gated_delta_net(q, k, v, g, beta, initial_state=pool if "state_indices" in kw else pool[:4],
                        output_final_state=True, **kw)
