"""The op's outputs carry checkpoint names, so model code can choose a remat policy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gdn_jax import gated_delta_net
from gdn_jax.api import REMAT_NAMES


def _inputs(T=20):
    ks = jax.random.split(jax.random.key(0), 6)
    q, k = (jax.random.normal(x, (1, T, 1, 16)) for x in ks[:2])
    v = jax.random.normal(ks[2], (1, T, 2, 16))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (1, T, 2)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (1, T, 2)))
    return q, k, v, g, beta, jax.random.normal(ks[5], (1, 2, 16, 16))


def _loss(q, k, v, g, beta, h0):
    o, ht, snaps = gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                   num_snapshots=2)
    return jnp.sum(jnp.tanh(o)) + jnp.sum(ht * ht) + jnp.sum(jnp.sin(snaps))


def test_outputs_are_named_and_a_names_policy_keeps_the_gradients():
    args = _inputs()
    jaxpr = str(jax.make_jaxpr(_loss)(*args))
    for name in REMAT_NAMES:
        assert f"name={name}" in jaxpr, name
    want = jax.grad(_loss, argnums=tuple(range(6)))(*args)
    policy = jax.checkpoint_policies.save_only_these_names("gdn_output", "gdn_final_state")
    got = jax.grad(jax.checkpoint(_loss, policy=policy), argnums=tuple(range(6)))(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
