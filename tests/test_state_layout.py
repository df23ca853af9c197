"""`state_layout="vk"` on the XLA paths: the same numbers as "kv", computed without
transposing the state (the layout exists so a decode loop pays nothing for it)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import gated_delta_net
from helpers import slow_except

Hk, Hv, K, V = 1, 2, 16, 32


def _inputs(B, T, kda, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, Hk, K))
    k = jax.random.normal(ks[1], (B, T, Hk, K))
    v = jax.random.normal(ks[2], (B, T, Hv, V))
    # weak decay: the initial state still matters at the last token
    g = -0.05 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hv, K) if kda else (B, T, Hv)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hv)))
    h0 = jax.random.normal(ks[5], (B, Hv, K, V))
    return (q, k, v, g, beta), h0


# (impl, T, kda, packed, snapshots): both XLA fast paths, GDA/KDA, packed and snapshots
CASES = [("recurrent", 5, False, True, 2), ("recurrent", 20, True, False, 0),
         ("chunked", 100, False, True, 0), ("chunked", 100, True, False, 0)]


# Everyday tier: the recurrent path with packed sequences and snapshots.
@pytest.mark.parametrize("impl,T,kda,packed,ns", slow_except(CASES, 0),
                         ids=[f"{c[0]}-T{c[1]}-{'KDA' if c[2] else 'GDA'}{'-packed' if c[3] else ''}"
                              f"{'-snaps' if c[4] else ''}" for c in CASES])
def test_vk_is_kv_transposed_forward_and_gradients(impl, T, kda, packed, ns):
    args, h0 = _inputs(1 if packed else 2, T, kda)
    kw = dict(cu_seqlens=jnp.asarray([0, 3, T], jnp.int32)) if packed else {}
    if packed:
        h0 = jnp.concatenate([h0, 0.5 * h0])

    def loss(h0, q, k, v, g, beta, layout):
        out = gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                              impl=impl, backend="xla", state_layout=layout, num_snapshots=ns,
                              use_qk_l2norm_in_kernel=True, **kw)
        o, s = out[0], out[1]
        snaps = out[2] if ns else jnp.zeros(())
        if layout == "vk":
            s, snaps = jnp.swapaxes(s, -1, -2), (jnp.swapaxes(snaps, -1, -2) if ns else snaps)
        return jnp.sum(o ** 2) + jnp.sum(s ** 3) + jnp.sum(jnp.sin(snaps)), (o, s, snaps)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True),
                static_argnums=6)
    (_, kv_out), kv_grads = f(h0, *args, "kv")
    (_, vk_out), vk_grads = f(jnp.swapaxes(h0, -1, -2), *args, "vk")
    vk_grads = (jnp.swapaxes(vk_grads[0], -1, -2),) + vk_grads[1:]
    for a, b in zip(kv_out + kv_grads, vk_out + vk_grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                                   atol=1e-5 * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("kda", slow_except([False, True], 0), ids=["GDA", "KDA"])
def test_vk_decode_step_never_transposes_the_state(kda):
    """The compiled decode step (donated state) updates the "vk" state in place: no
    transpose or copy the size of the state anywhere in the program."""
    B = 4
    args, h0 = _inputs(B, 1, kda)
    h0 = jnp.swapaxes(h0, -1, -2)
    step = jax.jit(lambda h, *a: gated_delta_net(*a, initial_state=h, output_final_state=True,
                                                 backend="xla", state_layout="vk"),
                   donate_argnums=0)
    hlo = step.lower(h0, *args).compile().as_text()
    assert re.search(r"input_output_alias=\{ \{1\}: \(0,", hlo), "state not updated in place"
    state = rf"f32\[{B},{Hv},({V},{K}|{K},{V})\]"  # either layout's state-sized array
    big = [line.strip()[:160] for line in hlo.splitlines()
           if re.search(rf"%\S*(transpose|copy)\S* = {state}", line)
           or re.search(rf"= {state}\S* (transpose|copy)\(", line)]
    assert not big, big
    out, ht = step(h0 + 0.0, *args)
    ref_o, ref_h = gated_delta_net(*args, initial_state=jnp.swapaxes(h0, -1, -2),
                                   output_final_state=True, impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_o), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jnp.swapaxes(ht, -1, -2)), np.asarray(ref_h),
                               rtol=1e-5, atol=1e-5)
